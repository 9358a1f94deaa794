#!/usr/bin/env python
"""The load generator of bench/telemetry.py: many simulated node agents in one process, speaking
docs/agent-protocol.md exactly as ``neocloud-agent`` does, but leaner and countable.

What is the same as the real agent (``provisioning/agent/client.py``): one WebSocket per node to
``/agent/v1/`` with the node's stored secret as a bearer token, the ``websockets`` library with its
defaults (permessage-deflate offered, a ping every 20 s), ``welcome`` → ``hello`` with the inventory of
the simulated backend → a ``heartbeat`` every ``heartbeat_seconds`` and a ``telemetry`` batch every
``telemetry_seconds``. A batch is built like ``NodeAgent._telemetry``: the simulated backend's readings
under dcgm-exporter's names (``telemetry_reading``), the health readings every 10th tick, ``at`` =
``time.time()`` when the batch is built, ``json.dumps`` of the frame.

What is different, and why: the agents run on uvloop, without the journal, the state lock and the
reconnection loop (a dropped connection is counted, not retried), and on a fixed schedule (each node
at its own phase in the second; a tick missed because the process was late is counted as skipped, not
sent late), so the offered load is known exactly. Every batch sent is recorded (node, ``at``), so
bench/telemetry.py can count what the server accepted and the browsers received against what was sent.

Driven by bench/telemetry.py over stdin/stdout, one JSON object per line:

    {"cmd": "connect", "n": 500}      connect nodes [0, 500) (those not yet connected)
    {"cmd": "telemetry", "on": true}  start (or stop) sending telemetry on every connected node
    {"cmd": "stop"}                   close everything, write the results file, exit

Each command is answered with one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from array import array
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import websockets  # noqa: E402
from websockets.exceptions import ConnectionClosed, WebSocketException  # noqa: E402

from provisioning.agent import __version__  # noqa: E402
from provisioning.agent.backends import get_backend  # noqa: E402
from provisioning.agent.client import HEALTH_EVERY_TICKS, _put, telemetry_reading  # noqa: E402

CONNECT_CONCURRENCY = 16
WELCOME_TIMEOUT_S = 60.0


def say(message: str) -> None:
    print(f"[agents] {message}", file=sys.stderr, flush=True)


def reply(data: dict) -> None:
    print(json.dumps(data), flush=True)


class Stats:
    def __init__(self) -> None:
        self.sent_node = array("I")
        self.sent_at = array("d")
        self.skipped = 0
        self.heartbeats = 0
        self.errors: dict[str, int] = {}
        self.commands = 0
        self.disconnects: list[dict] = []
        self.connect_failures: list[str] = []


class Agent:
    def __init__(self, index: int, hostname: str, secret: str, gpus: int, gpu_name: str, memory_mib: int):
        self.index, self.hostname, self.secret = index, hostname, secret
        self.backend = get_backend("simulated", hostname=hostname, gpus=gpus, gpu_name=gpu_name, memory_mib=memory_mib)
        self.connection = None
        self.seq = 0
        self.beats = 0
        self.tasks: list[asyncio.Task] = []

    def hello(self) -> str:
        inventory = self.backend.inventory()
        return json.dumps(
            {
                "type": "hello",
                "agent_version": __version__,
                "driver_version": inventory.driver_version,
                "backend": self.backend.name,
                "gpus": [
                    {
                        "index": g.index,
                        "uuid": g.uuid,
                        "name": g.name,
                        "memory_mib": g.memory_mib,
                        "power_limit_w": g.power_limit_w,
                    }
                    for g in inventory.gpus
                ],
            }
        )

    def telemetry(self) -> tuple[str, float]:
        """As NodeAgent._telemetry builds it."""
        self.seq += 1
        gpus = [telemetry_reading(reading) for reading in self.backend.sample()]
        if self.seq % HEALTH_EVERY_TICKS == 1:
            by_uuid = {gpu["uuid"]: gpu for gpu in gpus}
            for health in self.backend.health():
                gpu = by_uuid.get(health.uuid)
                if gpu is not None:
                    _put(gpu, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", health.ecc_uncorrected)
                    _put(gpu, "DCGM_FI_DEV_XID_ERRORS", health.xid_count)
        at = time.time()
        return json.dumps({"type": "telemetry", "seq": self.seq, "at": at, "gpus": gpus}), at


class Fleet:
    def __init__(self, url: str, agents: list[Agent], seed: int):
        self.url, self.agents = url, agents
        self.stats = Stats()
        self.telemetry_on = False
        self.connected = 0  # agents [0, connected) were tried
        self.rng = random.Random(seed)  # noqa: S311 - phases of the schedule, nothing secret

    async def connect(self, n: int) -> dict:
        started = time.monotonic()
        todo = self.agents[self.connected : n]
        semaphore = asyncio.Semaphore(CONNECT_CONCURRENCY)
        failures_before = len(self.stats.connect_failures)

        async def one(agent: Agent) -> None:
            async with semaphore:
                await self._open(agent)

        await asyncio.gather(*(one(agent) for agent in todo))
        self.connected = max(self.connected, n)
        failed = len(self.stats.connect_failures) - failures_before
        return {"connected": len(todo) - failed, "failed": failed, "seconds": round(time.monotonic() - started, 2)}

    async def _open(self, agent: Agent) -> None:
        try:
            connection = await websockets.connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {agent.secret}"},
                user_agent_header=f"neocloud-agent/{__version__}",
                open_timeout=60,
                proxy=None,
            )
            async with asyncio.timeout(WELCOME_TIMEOUT_S):
                welcome = json.loads(await connection.recv())
            if welcome.get("type") != "welcome":
                raise RuntimeError(f"expected welcome, got {welcome.get('type')!r}")
            await connection.send(agent.hello())
        except (OSError, TimeoutError, WebSocketException, RuntimeError, ValueError) as exc:
            self.stats.connect_failures.append(f"{agent.hostname}: {type(exc).__name__}: {exc}")
            return
        agent.connection = connection
        heartbeat = float(welcome.get("heartbeat_seconds") or 10)
        interval = float(welcome.get("telemetry_seconds") or 1)
        agent.tasks = [
            asyncio.create_task(self._telemetry_loop(agent, interval)),
            asyncio.create_task(self._heartbeat_loop(agent, heartbeat)),
            asyncio.create_task(self._reader(agent)),
        ]

    async def _telemetry_loop(self, agent: Agent, interval: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.rng.random() * interval
        stats = self.stats
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            late = loop.time() - due
            if late >= interval:  # the process fell behind: those ticks are not sent late
                missed = int(late // interval)
                due += missed * interval
                if self.telemetry_on:
                    stats.skipped += missed
            due += interval
            if not self.telemetry_on:
                continue
            text, at = agent.telemetry()
            try:
                await agent.connection.send(text)
            except ConnectionClosed:
                return
            stats.sent_node.append(agent.index)
            stats.sent_at.append(at)

    async def _heartbeat_loop(self, agent: Agent, interval: float) -> None:
        await asyncio.sleep(self.rng.random() * interval)
        while True:
            agent.beats += 1
            try:
                await agent.connection.send(json.dumps({"type": "heartbeat", "seq": agent.beats}))
            except ConnectionClosed:
                return
            self.stats.heartbeats += 1
            await asyncio.sleep(interval)

    async def _reader(self, agent: Agent) -> None:
        connection = agent.connection
        try:
            async for raw in connection:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    continue
                kind = frame.get("type")
                if kind == "error":
                    code = str(frame.get("code"))
                    self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
                elif kind == "command":
                    self.stats.commands += 1
        except ConnectionClosed:
            pass
        finally:
            self.stats.disconnects.append(
                {
                    "node": agent.hostname,
                    "at": time.time(),
                    "code": connection.close_code,
                    "reason": connection.close_reason or "",
                }
            )
            for task in agent.tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def close(self) -> None:
        for agent in self.agents:
            for task in agent.tasks:
                task.cancel()
        connections = [agent.connection for agent in self.agents if agent.connection is not None]

        async def close_one(connection) -> None:
            try:
                async with asyncio.timeout(5):
                    await connection.close()
            except (TimeoutError, WebSocketException, OSError):
                pass

        for start in range(0, len(connections), 200):
            await asyncio.gather(*(close_one(c) for c in connections[start : start + 200]))


def stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, '{"cmd": "stop"}')  # the parent went away


async def main_async(args: argparse.Namespace) -> int:
    config = json.loads(Path(args.config).read_text())
    started = time.monotonic()
    agents = [
        Agent(i, node["hostname"], node["secret"], config["gpus"], config["gpu_name"], config["memory_mib"])
        for i, node in enumerate(config["nodes"])
    ]
    say(f"{len(agents)} simulated nodes built in {time.monotonic() - started:.1f} s")
    fleet = Fleet(config["url"], agents, seed=config.get("seed", 1))
    queue: asyncio.Queue = asyncio.Queue()
    threading.Thread(target=stdin_lines, args=(asyncio.get_running_loop(), queue), daemon=True).start()
    reply({"ready": True, "nodes": len(agents)})
    while True:
        command = json.loads(await queue.get())
        name = command.get("cmd")
        if name == "connect":
            result = await fleet.connect(min(int(command["n"]), len(agents)))
            say(f"connected {result['connected']} more nodes in {result['seconds']} s ({result['failed']} failed)")
            reply(result)
        elif name == "telemetry":
            fleet.telemetry_on = bool(command["on"])
            reply({"telemetry": fleet.telemetry_on, "sent": len(fleet.stats.sent_at)})
        elif name == "stop":
            fleet.telemetry_on = False
            await fleet.close()
            stats = fleet.stats
            Path(args.results).write_text(
                json.dumps(
                    {
                        "sent_node": stats.sent_node.tolist(),
                        "sent_at": stats.sent_at.tolist(),
                        "skipped": stats.skipped,
                        "heartbeats": stats.heartbeats,
                        "errors": stats.errors,
                        "commands": stats.commands,
                        "disconnects": stats.disconnects,
                        "connect_failures": stats.connect_failures,
                    }
                )
            )
            reply({"stopped": True, "sent": len(stats.sent_at)})
            return 0
        else:
            reply({"error": f"unknown command {name!r}"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="JSON: url, nodes [{hostname, secret}], gpus, gpu_name...")
    parser.add_argument("--results", required=True, help="where to write what was sent")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        return uvloop.run(main_async(args))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

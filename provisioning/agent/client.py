"""One node's agent: the asyncio side of docs/agent-protocol.md.

It keeps one outbound WebSocket to the console, reconnecting after any drop with jittered exponential
backoff, and stops for good only when the console refuses its secret (close 4401/4403). On each
connection: ``welcome`` → ``hello`` with the inventory → heartbeats (and telemetry, and a health check
of the servers the driver runs, reported in ``workload`` frames when one changes), while frames from the
console are handled as they come. Commands are journaled before they are acknowledged and applied in
their own tasks, so heartbeats go on during a long provisioning and an apply outlives the connection it
came on: its result goes out on whichever connection is up when it ends (and, if none is, the console
re-pushes the command on reconnect and hears the stored result).
"""

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from provisioning.agent import __version__
from provisioning.agent.backends.base import GpuBackend
from provisioning.agent.credentials import Credentials, load_credentials, store_credentials
from provisioning.agent.drivers.base import DriverError, HostDriver, Params, ProgressCallback
from provisioning.agent.enrollment import websocket_url
from provisioning.agent.journal import FILENAME as JOURNAL_FILENAME
from provisioning.agent.journal import Journal
from provisioning.agent.state import state_lock

logger = logging.getLogger(__name__)

REFUSAL_CLOSE_CODES = frozenset({4401, 4403})
REFUSAL_HTTP_STATUSES = {401: 4401, 403: 4403}  # a console that refuses before accepting the upgrade
OPEN_TIMEOUT_S = 10.0
WELCOME_TIMEOUT_S = 30.0
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_WORKLOAD_CHECK_S = 5.0

Frame = dict[str, Any]


class AgentRefused(Exception):
    """The console refused this node's secret: unknown, revoked or rotated away. Retrying cannot help
    until the host is enrolled again."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"the console refused this node's secret (close code {code}{': ' + reason if reason else ''})")
        self.code = code


class ProtocolViolation(Exception):
    """The console did not speak the protocol (e.g. no ``welcome`` first); treated as a dropped connection."""


def backoff_delay(
    attempt: int, *, rng: random.Random, base_s: float = 1.0, cap_s: float = 60.0, jitter: float = 0.5
) -> float:
    """The wait before reconnection number ``attempt`` (0-based): ``base_s`` doubling up to ``cap_s``, then
    scaled by a uniform factor in [1 - jitter, 1 + jitter] so a site's agents do not reconnect in step
    after the console restarts."""
    nominal = min(cap_s, base_s * 2 ** min(attempt, 32))
    return nominal * rng.uniform(1 - jitter, 1 + jitter)


@dataclass
class Backoff:
    """Reconnection delays (1 s doubling to 60 s, ±50 % jitter), back to the start after a connection
    that lasted ``reset_after_s``: a long healthy connection means the next drop is news, not a storm."""

    base_s: float = 1.0
    cap_s: float = 60.0
    jitter: float = 0.5
    reset_after_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        delay = backoff_delay(self.attempt, rng=self.rng, base_s=self.base_s, cap_s=self.cap_s, jitter=self.jitter)
        self.attempt += 1
        return delay

    def connection_lasted(self, seconds: float) -> None:
        if seconds >= self.reset_after_s:
            self.attempt = 0


def _decode(raw: str | bytes) -> Frame | None:
    """A frame is a JSON object with a string ``type``; anything else is None."""
    try:
        frame = json.loads(raw)
    except ValueError:
        return None
    return frame if isinstance(frame, dict) and isinstance(frame.get("type"), str) else None


def _result_frame(command_id: str, result: dict[str, Any]) -> Frame:
    return {"type": "result", "command": command_id, **result}


class NodeAgent:
    def __init__(
        self,
        *,
        server: str,
        state_dir: Path,
        backend: GpuBackend,
        driver: HostDriver,
        backoff: Backoff | None = None,
        workload_check_s: float = DEFAULT_WORKLOAD_CHECK_S,
    ) -> None:
        """Raises NotEnrolled when the state directory holds no credential."""
        self._url = websocket_url(server)
        self._state_dir = state_dir
        self._backend = backend
        self._driver = driver
        self._backoff = backoff or Backoff()
        self._credentials: Credentials = load_credentials(state_dir)
        self._journal: Journal | None = None
        self._connection: ClientConnection | None = None
        self._applying: dict[str, asyncio.Task[None]] = {}
        self._driver_lock = asyncio.Lock()  # provision, release and access of one host never interleave
        self._beats = 0
        self.state = "stopped"
        self.heartbeat_seconds = DEFAULT_HEARTBEAT_S
        self.telemetry_seconds: float | None = None
        self._telemetry_seq = 0
        self.workload_check_seconds = workload_check_s
        self._reported: dict[str, str] = {}  # the workload state each server was last reported in

    @property
    def node(self) -> str:
        return self._credentials.node

    async def run(self) -> None:
        """Stay connected until cancelled. Raises AgentRefused when the console refuses the secret."""
        with state_lock(self._state_dir):
            self._journal = Journal(self._state_dir / JOURNAL_FILENAME)
            self._backend.set_load(self._driver.gpus_in_use())  # workloads that outlived a restart
            try:
                await self._start_driver()
                await self._connect_forever()
            finally:
                await self._abandon_applies()
                try:
                    await self._driver.shutdown()  # a pretend host's real processes stop with it
                except Exception:  # the agent stops all the same; what was left running is in the log
                    logger.exception("%s: stopping the driver's workloads failed", self.node)
                self._set_state("stopped")

    async def _start_driver(self) -> None:
        try:
            await self._driver.start()  # a pretend host's SSH servers, stopped with its agent
        except Exception:  # the agent serves all the same; what did not start again is in the log
            logger.exception("%s: starting the driver's servers again failed", self.node)

    async def _connect_forever(self) -> None:
        while True:
            self._set_state("connecting")
            lasted = await self._connect_once()
            self._backoff.connection_lasted(lasted)
            delay = self._backoff.next_delay()
            self._set_state("disconnected", f"reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def _connect_once(self) -> float:
        """One connection from handshake to drop; returns how long it was open (0 if it never opened)."""
        loop = asyncio.get_running_loop()
        opened_at: float | None = None
        try:
            async with websockets.connect(
                self._url,
                additional_headers={"Authorization": f"Bearer {self._credentials.secret}"},
                user_agent_header=f"neocloud-agent/{__version__}",
                open_timeout=OPEN_TIMEOUT_S,
            ) as connection:
                opened_at = loop.time()
                await self._serve(connection)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in REFUSAL_HTTP_STATUSES:
                self._set_state("refused", f"HTTP {status}")
                raise AgentRefused(REFUSAL_HTTP_STATUSES[status], f"HTTP {status}") from None
            logger.warning("%s: the console refused the connection with HTTP %s", self.node, status)
        except (OSError, TimeoutError, WebSocketException, ProtocolViolation) as exc:
            logger.warning("%s: connection failed: %s", self.node, exc or type(exc).__name__)
        else:
            code, reason = connection.close_code, connection.close_reason or ""
            if code in REFUSAL_CLOSE_CODES:
                self._set_state("refused", f"close code {code}")
                raise AgentRefused(code, reason)
            logger.info("%s: the connection closed (code %s%s)", self.node, code, f": {reason}" if reason else "")
        return 0.0 if opened_at is None else loop.time() - opened_at

    async def _serve(self, connection: ClientConnection) -> None:
        """The life of one connection; returns when the console or the network closes it."""
        self._connection = connection
        try:
            await self._receive_welcome(connection)
            self._set_state("connected")
            await self._send(self._hello())
            senders = [asyncio.create_task(self._every(interval, build)) for interval, build in self._periodic()]
            senders.append(asyncio.create_task(self._watch_workloads()))
            try:
                await self._receive(connection)
            finally:
                for sender in senders:
                    sender.cancel()
                await asyncio.wait(senders)
        except ConnectionClosed:
            pass
        finally:
            self._connection = None

    def _periodic(self) -> list[tuple[float, Callable[[], Frame]]]:
        """Frames sent on a timer while connected: heartbeats, and telemetry when the console asks for it."""
        periodic = [(self.heartbeat_seconds, self._heartbeat)]
        if self.telemetry_seconds:
            periodic.append((self.telemetry_seconds, self._telemetry))
        return periodic

    def _telemetry(self) -> Frame:
        """One batch for the whole node (docs/agent-protocol.md, Telemetry): dcgm-exporter's names."""
        self._telemetry_seq += 1
        gpus = [telemetry_reading(reading) for reading in self._backend.sample()]
        if self._telemetry_seq % HEALTH_EVERY_TICKS == 1:  # health reads are rarer than the cheap ones
            by_uuid = {gpu["uuid"]: gpu for gpu in gpus}
            for health in self._backend.health():
                gpu = by_uuid.get(health.uuid)
                if gpu is not None:
                    _put(gpu, "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", health.ecc_uncorrected)
                    _put(gpu, "DCGM_FI_DEV_XID_ERRORS", health.xid_count)
        return {"type": "telemetry", "seq": self._telemetry_seq, "at": time.time(), "gpus": gpus}

    async def _every(self, interval: float, build: Callable[[], Frame]) -> None:
        # Start at a random point of the interval: agents that connect together (a fleet host, or all
        # of them after a console restart) would otherwise send in bursts (bench/telemetry: p99 136 ms
        # in step against 4 ms spread out).
        await asyncio.sleep(random.uniform(0, interval))  # noqa: S311 - spreading load, not a secret
        while True:
            if not await self._send(build()):
                return
            await asyncio.sleep(interval)

    async def _watch_workloads(self) -> None:
        """Check the driver's servers every ``workload_check_seconds`` and send a ``workload`` frame for
        each whose state changed since it was last reported; a server never reported counts as healthy,
        so a healthy one costs no frame. What was reported is forgotten on each connection: the console
        on the other end may not have heard it (a restart), so what is still wrong is said again."""
        self._reported = {}
        while True:
            await asyncio.sleep(self.workload_check_seconds)
            try:
                states = await self._driver.check_workloads()
            except Exception:  # a check that broke is logged; the next one may work, heartbeats go on
                logger.exception("%s: checking the workloads failed", self.node)
                continue
            self._reported = {
                reservation: state for reservation, state in self._reported.items() if reservation in states
            }
            for reservation, health in states.items():
                if health.state == self._reported.get(reservation, "healthy"):
                    continue
                frame = {"type": "workload", "reservation": reservation, "state": health.state, "detail": health.detail}
                if not await self._send(frame):
                    return
                level = logging.INFO if health.state == "healthy" else logging.WARNING
                logger.log(level, "%s: workload %s is %s: %s", self.node, reservation, health.state, health.detail)
                self._reported[reservation] = health.state

    def _heartbeat(self) -> Frame:
        self._beats += 1
        return {"type": "heartbeat", "seq": self._beats}

    def _hello(self) -> Frame:
        inventory = self._backend.inventory()
        return {
            "type": "hello",
            "agent_version": __version__,
            "driver_version": inventory.driver_version,
            "backend": self._backend.name,
            "gpus": [asdict(gpu) for gpu in inventory.gpus],
        }

    async def _receive_welcome(self, connection: ClientConnection) -> None:
        async with asyncio.timeout(WELCOME_TIMEOUT_S):
            frame = _decode(await connection.recv())
        if frame is None or frame["type"] != "welcome":
            raise ProtocolViolation(f"expected a welcome frame first, got {frame and frame['type']!r}")
        heartbeat, telemetry = frame.get("heartbeat_seconds"), frame.get("telemetry_seconds")
        if isinstance(heartbeat, int | float) and heartbeat > 0:
            self.heartbeat_seconds = float(heartbeat)
        if isinstance(telemetry, int | float) and telemetry > 0:
            self.telemetry_seconds = float(telemetry)

    async def _receive(self, connection: ClientConnection) -> None:
        handlers: dict[str, Callable[[Frame], Awaitable[None]]] = {
            "command": self._on_command,
            "rotate_secret": self._on_rotate_secret,
            "error": self._on_error,
        }
        while True:
            frame = _decode(await connection.recv())
            if frame is None:
                await self._send_error("bad_frame", "Frames are JSON objects with a string 'type'.")
                continue
            handler = handlers.get(frame["type"])
            if handler is None:
                await self._send_error("unknown_type", f"Unknown frame type {frame['type']!r}.")
                continue
            await handler(frame)

    async def _send(self, frame: Frame) -> bool:
        """Send on the current connection; False (and the frame dropped) when there is none. Safe to
        drop: an unanswered command is re-pushed on reconnect and its stored result re-sent."""
        connection = self._connection
        if connection is None:
            return False
        try:
            await connection.send(json.dumps(frame))
        except ConnectionClosed:
            return False
        return True

    async def _send_error(self, code: str, message: str) -> None:
        await self._send({"type": "error", "code": code, "message": message})

    # --- Frames from the console ---

    async def _on_command(self, frame: Frame) -> None:
        command_id, kind, params = frame.get("id"), frame.get("kind"), frame.get("params", {})
        if not (isinstance(command_id, str) and command_id and isinstance(kind, str) and isinstance(params, dict)):
            await self._send_error("bad_frame", "command: 'id' and 'kind' must be strings, 'params' an object.")
            return
        journal = self._require_journal()
        entry = journal.get(command_id)
        if entry is None:
            journal.begin(command_id, kind)  # durable before the ack promises anything
            await self._send({"type": "ack", "command": command_id})
            task = asyncio.create_task(self._apply(command_id, kind, params), name=f"command {command_id}")
            self._applying[command_id] = task
            task.add_done_callback(lambda _: self._applying.pop(command_id, None))
            return
        await self._send({"type": "ack", "command": command_id})
        if entry.result is not None:  # done: re-send the stored outcome
            await self._send(_result_frame(command_id, entry.result))
        # else still applying in this process (the journal turned older ones into "interrupted" when it
        # opened): its result goes out when it ends.

    async def _on_rotate_secret(self, frame: Frame) -> None:
        secret = frame.get("secret")
        if not isinstance(secret, str) or not secret:
            await self._send_error("bad_frame", "rotate_secret: 'secret' must be a non-empty string.")
            return
        credentials = Credentials(node=self.node, secret=secret)
        store_credentials(self._state_dir, credentials)
        self._credentials = credentials  # used from the next connection on
        logger.info("%s: secret rotated", self.node)
        await self._send({"type": "secret_rotated"})

    async def _on_error(self, frame: Frame) -> None:
        logger.warning("%s: the console refused a frame: %s %s", self.node, frame.get("code"), frame.get("message"))

    # --- Applying commands ---

    async def _apply(self, command_id: str, kind: str, params: Params) -> None:
        async def progress(step: str, percent: int) -> None:
            percent = max(0, min(100, int(percent)))
            await self._send({"type": "progress", "command": command_id, "step": step, "percent": percent})

        try:
            result = {"ok": True, "detail": await self._execute(kind, params, progress)}
        except DriverError as exc:
            result = {"ok": False, "detail": {}, "error": str(exc)}
        except Exception as exc:
            logger.exception("%s: command %s (%s) crashed", self.node, command_id, kind)
            result = {"ok": False, "detail": {}, "error": f"agent error: {exc!r}"}
        self._require_journal().finish(command_id, result)
        if result["ok"]:
            logger.info("%s: command %s (%s) succeeded", self.node, command_id, kind)
        else:  # the error is the driver's sentence, written for the tenant: no secret in it
            logger.warning("%s: command %s (%s) failed: %s", self.node, command_id, kind, result["error"])
        await self._send(_result_frame(command_id, result))

    async def _execute(self, kind: str, params: Params, progress: ProgressCallback) -> dict[str, Any]:
        if kind == "health_check":
            return {"backend": self._backend.name, "gpus": [asdict(gpu) for gpu in self._backend.health()]}
        if kind not in ("provision", "release", "access"):
            raise DriverError(f"unknown command kind {kind!r}")
        async with self._driver_lock:
            try:
                if kind == "provision":
                    return await self._driver.provision(params, progress)
                if kind == "access":
                    return await self._driver.update_access(params, progress)
                return await self._driver.release(params, progress)
            finally:  # busy: the GPUs of the reservations still provisioned, whatever this one's outcome
                self._backend.set_load(self._driver.gpus_in_use())

    async def _abandon_applies(self) -> None:
        """On shutdown, cut off what is still applying: the journal keeps it ``applying``, and the next
        start reports it as interrupted instead of applying it again."""
        tasks = list(self._applying.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def _require_journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("the journal is opened by run()")
        return self._journal

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state or detail:
            level = logging.WARNING if state == "refused" else logging.INFO
            logger.log(level, "%s: %s%s", self.node, state, f" ({detail})" if detail else "")
        self.state = state


HEALTH_EVERY_TICKS = 10


def _put(target: dict, name: str, value) -> None:
    if value is not None:
        target[name] = value


def telemetry_reading(reading) -> dict:
    """A GpuReading under dcgm-exporter's field names; readings the GPU refused are left out."""
    gpu = {"uuid": reading.uuid, "index": reading.index}
    _put(gpu, "DCGM_FI_DEV_GPU_UTIL", reading.gpu_util)
    _put(gpu, "DCGM_FI_DEV_FB_USED", reading.mem_used_mib)
    _put(gpu, "DCGM_FI_DEV_FB_TOTAL", reading.mem_total_mib)
    _put(gpu, "DCGM_FI_DEV_POWER_USAGE", None if reading.power_w is None else round(reading.power_w, 3))
    _put(gpu, "DCGM_FI_DEV_GPU_TEMP", reading.temp_c)
    _put(gpu, "DCGM_FI_DEV_SM_CLOCK", reading.sm_mhz)
    _put(gpu, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", reading.energy_mj)
    return gpu

#!/usr/bin/env python
"""The measuring client of bench/telemetry.py: subscribes like a browser and timestamps every frame.

It opens the WebSockets the portal's pages open: ``/ws/fleet/`` as a staff user (every node's summary)
and ``/ws/reservations/<id>/`` as a member of the tenant holding the reservation (each of its nodes' full
batch), authenticated by the Django session cookie, with the page's ``Origin`` header, offering
permessage-deflate as browsers do and sending no pings of its own (browsers answer the server's). For
each telemetry frame it records the receive time (``time.time()``, the clock the agents stamp ``at``
with: same machine), the frame's ``at`` and its node; latency = receive time - ``at``.

Driven by bench/telemetry.py over stdin/stdout, one JSON object per line:

    {"cmd": "count"}   → {"fleet": frames so far, "tenant": ..., "last": time of the last frame}
    {"cmd": "stop"}    close, write the results file, exit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from array import array
from pathlib import Path

import websockets
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.typing import Origin


def say(message: str) -> None:
    print(f"[browser] {message}", file=sys.stderr, flush=True)


def reply(data: dict) -> None:
    print(json.dumps(data), flush=True)


class Feed:
    """One socket's frames: node index, ``at``, receive time."""

    def __init__(self, kind: str, url: str, cookie: str):
        self.kind, self.url, self.cookie = kind, url, cookie
        self.node = array("i")
        self.at = array("d")
        self.received = array("d")
        self.other = 0  # frames that are not telemetry (node_state events...)
        self.closed: dict | None = None


async def listen(feed: Feed, origin: str, node_index: dict[str, int], opened: asyncio.Event) -> None:
    try:
        connection = await websockets.connect(
            feed.url,
            origin=Origin(origin),
            additional_headers={"Cookie": feed.cookie},
            user_agent_header="Mozilla/5.0 (bench/telemetry measuring client)",
            ping_interval=None,
            open_timeout=60,
            max_size=2**22,
            proxy=None,
        )
    except (OSError, TimeoutError, WebSocketException) as exc:
        feed.closed = {"error": f"{type(exc).__name__}: {exc}", "at": time.time()}
        opened.set()
        return
    opened.set()
    loads, now = json.loads, time.time
    append_node, append_at, append_received = feed.node.append, feed.at.append, feed.received.append
    try:
        async for raw in connection:
            received = now()
            frame = loads(raw)
            at = frame.get("at")
            if at is None:
                feed.other += 1
                continue
            append_received(received)
            append_at(at)
            append_node(node_index.get(frame.get("node"), -1))
    except ConnectionClosed:
        pass
    feed.closed = {"code": connection.close_code, "reason": connection.close_reason or "", "at": time.time()}


def stdin_lines(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    for line in sys.stdin:
        loop.call_soon_threadsafe(queue.put_nowait, line)
    loop.call_soon_threadsafe(queue.put_nowait, '{"cmd": "stop"}')


async def main_async(args: argparse.Namespace) -> int:
    config = json.loads(Path(args.config).read_text())
    node_index = {hostname: i for i, hostname in enumerate(config["hostnames"])}
    base, origin = config["base"], config["origin"]
    feeds = [Feed("fleet", f"{base}/ws/fleet/", config["staff_cookie"])]
    feeds += [Feed("tenant", f"{base}/ws/reservations/{pk}/", config["tenant_cookie"]) for pk in config["reservations"]]
    events = [asyncio.Event() for _ in feeds]
    tasks = [asyncio.create_task(listen(f, origin, node_index, e)) for f, e in zip(feeds, events, strict=True)]
    for event in events:
        await event.wait()
    refused = [f.url for f in feeds if f.closed]
    queue: asyncio.Queue = asyncio.Queue()
    threading.Thread(target=stdin_lines, args=(asyncio.get_running_loop(), queue), daemon=True).start()
    say(f"{len(feeds) - len(refused)} of {len(feeds)} sockets open")
    reply({"ready": True, "open": len(feeds) - len(refused), "refused": refused})
    while True:
        command = json.loads(await queue.get())
        if command.get("cmd") == "count":
            last = max((f.received[-1] for f in feeds if len(f.received)), default=None)
            reply(
                {
                    "fleet": sum(len(f.at) for f in feeds if f.kind == "fleet"),
                    "tenant": sum(len(f.at) for f in feeds if f.kind == "tenant"),
                    "last": last,
                    "closed": sum(1 for f in feeds if f.closed),
                }
            )
        elif command.get("cmd") == "stop":
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            Path(args.results).write_text(
                json.dumps(
                    [
                        {
                            "kind": f.kind,
                            "url": f.url,
                            "node": f.node.tolist(),
                            "at": f.at.tolist(),
                            "received": f.received.tolist(),
                            "other": f.other,
                            "closed": f.closed,
                        }
                        for f in feeds
                    ]
                )
            )
            reply({"stopped": True})
            return 0
        else:
            reply({"error": f"unknown command {command.get('cmd')!r}"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        return uvloop.run(main_async(args))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

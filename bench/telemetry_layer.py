#!/usr/bin/env python
"""The channel layer alone, for bench/telemetry.py's ceiling: how many ``group_send`` of a node's batch
one process makes per second, and how many its own consumer channel receives, with the layer that
``BENCH_CHANNEL_LAYER`` selects (bench/telemetry_settings.py). No server, no WebSocket: an upper bound
for what one ASGI process can fan out through that layer.

    DJANGO_SETTINGS_MODULE=bench.telemetry_settings BENCH_CHANNEL_LAYER=pubsub \\
        python bench/telemetry_layer.py --seconds 3 --size 2062 --tasks 32

Prints one JSON object: sent/s, received/s, and the messages sent but not received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


async def measure(seconds: float, size: int, tasks: int) -> dict:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    channel = await layer.new_channel()
    group = "ceiling"
    await layer.group_add(group, channel)
    message = {"type": "telemetry.frame", "text": "x" * size}
    sent = received = 0
    stop_sending = time.monotonic() + seconds

    async def sender() -> None:
        nonlocal sent
        while time.monotonic() < stop_sending:
            await layer.group_send(group, message)
            sent += 1

    async def receiver() -> None:
        nonlocal received
        while True:
            await layer.receive(channel)
            received += 1

    reader = asyncio.create_task(receiver())
    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(tasks)))
    elapsed = time.monotonic() - started
    received_in_time = received
    deadline = time.monotonic() + 10  # let the receiver drain what is still on its way
    last = -1
    while time.monotonic() < deadline and received != last:
        last = received
        await asyncio.sleep(0.5)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await layer.group_discard(group, channel)
    return {
        "group_send_per_s": round(sent / elapsed),
        "received_per_s": round(received_in_time / elapsed),
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "bytes": size,
        "tasks": tasks,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=32)
    args = parser.parse_args()
    import django

    django.setup()
    print(json.dumps(asyncio.run(measure(args.seconds, args.size, args.tasks))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Settings for the server that bench/telemetry.py starts: the development profile with switches that
exist only in the benchmark (the project's own settings are untouched).

- ``BENCH_CHANNEL_LAYER``: ``pubsub`` (default, what the project uses: ``RedisPubSubChannelLayer``) or
  ``core`` (``channels_redis.core.RedisChannelLayer``, with ``BENCH_CHANNEL_CAPACITY`` messages per
  channel, default 100 as in channels-redis).
- ``BENCH_CORE_REDIS``: how the core layer's Redis connection pool is configured. ``bench`` (default): no
  socket timeout and up to 10,000 connections, so that what is measured is the layer itself. ``default``:
  redis-py's defaults, which break the core layer with the versions pinned here (channels-redis 4.3.0,
  redis-py 8.1.0): redis-py 6+ times a read out after 5 s and the core layer blocks in ``BZPOPMIN`` for
  5 s when a process has nothing to receive, so the receiving consumer crashes (its WebSocket is closed
  with 1011); and redis-py 8's asyncio pool refuses a 101st concurrent command (``MaxConnectionsError``)
  instead of waiting, which the core layer reaches with a few hundred busy consumers.
- A channel-layer prefix of its own (``BENCH_CHANNEL_PREFIX``), so that the benchmark's groups never meet
  those of another console using the same Redis: pub/sub channels are shared by every Redis database.

    DJANGO_SETTINGS_MODULE=bench.telemetry_settings BENCH_CHANNEL_LAYER=core python -m daphne ...
"""

import os

from console.settings.development import *  # noqa: F403
from console.settings.development import REDIS_URL

_LAYER = os.environ.get("BENCH_CHANNEL_LAYER", "pubsub")
_PREFIX = os.environ.get("BENCH_CHANNEL_PREFIX", "bench-telemetry")

if _LAYER == "core":
    _host = REDIS_URL
    if os.environ.get("BENCH_CORE_REDIS", "bench") == "bench":
        _host = {"address": REDIS_URL, "socket_timeout": None, "max_connections": 10_000}
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                "hosts": [_host],
                "capacity": int(os.environ.get("BENCH_CHANNEL_CAPACITY", "100")),
                "prefix": _PREFIX,
            },
        }
    }
elif _LAYER == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": _PREFIX},
        }
    }
else:
    raise ValueError(f"BENCH_CHANNEL_LAYER must be pubsub or core, not {_LAYER!r}")

"""Requests in flight per endpoint, as the gateways see them: the autoscaler's signal.

Each gateway process keeps, per endpoint, the area under its in-flight count over time
(ConcurrencyMeter, pure: no I/O). About once a second it adds each endpoint's average over that second
and the requests that arrived in it to a per-endpoint Redis hash, one field per wall-clock second
(``concurrency_add``, on the gateway's pipeline), so several gateway processes add up: the total
concurrency of an endpoint is the sum of what each saw. The autoscaler reads the last minute back
(``concurrency_series``). Nothing is written per request, and the hash lives a few minutes only.

A request that finds its endpoint idle (no replica) is in flight from that moment: the concurrency it
adds is what wakes the endpoint from zero.
"""

import time
from dataclasses import dataclass

from console.kernel.stores import redis_client

KEY_PREFIX = "neocloud:endpoint-concurrency:"
KEEP_SECONDS = 300


def concurrency_key(endpoint_id: str) -> str:
    return f"{KEY_PREFIX}{endpoint_id}"


@dataclass
class _Gauge:
    in_flight: int = 0
    area: float = 0.0  # request-seconds since the last read
    arrived: int = 0
    changed: float = 0.0


class ConcurrencyMeter:
    """One gateway process's in-flight requests per endpoint. Not thread-safe: the event loop's own."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._gauges: dict[str, _Gauge] = {}
        self._read_at = clock()

    def _gauge(self, endpoint_id: str, now: float) -> _Gauge:
        gauge = self._gauges.get(endpoint_id)
        if gauge is None:
            gauge = self._gauges[endpoint_id] = _Gauge(changed=now)
        gauge.area += gauge.in_flight * (now - gauge.changed)
        gauge.changed = now
        return gauge

    def begin(self, endpoint_id: str) -> None:
        gauge = self._gauge(endpoint_id, self._clock())
        gauge.in_flight += 1
        gauge.arrived += 1

    def end(self, endpoint_id: str) -> None:
        gauge = self._gauge(endpoint_id, self._clock())
        gauge.in_flight = max(0, gauge.in_flight - 1)

    def in_flight(self, endpoint_id: str) -> int:
        gauge = self._gauges.get(endpoint_id)
        return gauge.in_flight if gauge else 0

    def read(self) -> dict[str, tuple[float, int]]:
        """Since the last read, per endpoint that had any: (average requests in flight, arrivals)."""
        now = self._clock()
        span = max(now - self._read_at, 1e-6)
        self._read_at = now
        readings = {}
        for endpoint_id in list(self._gauges):
            gauge = self._gauge(endpoint_id, now)
            if gauge.area or gauge.arrived:
                readings[endpoint_id] = (gauge.area / span, gauge.arrived)
            gauge.area, gauge.arrived = 0.0, 0
            if not gauge.in_flight:
                del self._gauges[endpoint_id]  # nothing in flight: it starts afresh when a request comes
        return readings


def concurrency_add(pipe, readings: dict[str, tuple[float, int]], *, now: float | None = None) -> None:
    """Queue on ``pipe`` (a Redis pipeline, sync or asyncio) the readings for the current second."""
    second = int(time.time() if now is None else now)
    for endpoint_id, (average, arrived) in readings.items():
        key = concurrency_key(endpoint_id)
        if average:
            pipe.hincrbyfloat(key, f"c{second}", round(average, 4))
        if arrived:
            pipe.hincrby(key, f"r{second}", arrived)
        pipe.expire(key, KEEP_SECONDS)


@dataclass(frozen=True)
class Series:
    """An endpoint's last seconds, oldest first, one value a second (0 where no gateway reported)."""

    concurrency: list[float]
    arrivals: list[int]


def concurrency_series(endpoint_ids, *, seconds: int, now: float | None = None, client=None) -> dict[str, Series]:
    """The last ``seconds`` complete seconds of each endpoint (the current one is still being added to)."""
    endpoint_ids = [str(pk) for pk in endpoint_ids]
    if not endpoint_ids:
        return {}
    last = int(time.time() if now is None else now) - 1
    client = client or redis_client()
    pipe = client.pipeline(transaction=False)
    for endpoint_id in endpoint_ids:
        pipe.hgetall(concurrency_key(endpoint_id))
    series = {}
    for endpoint_id, fields in zip(endpoint_ids, pipe.execute(), strict=True):
        values = {key.decode(): value for key, value in fields.items()}
        span = range(last - seconds + 1, last + 1)
        series[endpoint_id] = Series(
            concurrency=[float(values.get(f"c{second}", 0)) for second in span],
            arrivals=[int(values.get(f"r{second}", 0)) for second in span],
        )
    return series

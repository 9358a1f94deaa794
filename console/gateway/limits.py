"""Per-key request limits: a token bucket per API key in each gateway process."""

import time
from collections import OrderedDict

MAX_KEYS = 50_000  # buckets kept; the least recently used one goes first (it refills to full anyway)


class RateLimiter:
    def __init__(self, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, at]

    def take(self, key: str, now: float | None = None) -> tuple[bool, int, float]:
        """Take one request from ``key``'s bucket: (allowed, requests left, seconds until the next one
        is allowed, 0 when allowed)."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.burst), now]
            if len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return True, int(bucket[0]), 0.0
        return False, 0, (1.0 - bucket[0]) / self.rate

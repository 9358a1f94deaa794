"""Per-key request limits: a token bucket per API key in each gateway process, shared out between the
processes through Redis.

Each request takes a token from the key's bucket in the process that got it (no I/O on the request's
path). About once a second every process adds what each key took to a per-second counter in Redis and
reads the last full second's total: what the other processes let through then is taken off this
process's refill rate for the next second. One process alone refills at the full rate; N processes
sharing a key's traffic refill, together, at about the full rate (a key's tokens are shared out by
where its traffic went). A client on one kept-alive connection, which one process serves, gets the
whole rate.
"""

import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_KEYS = 50_000  # buckets kept; the least recently used one goes first (it refills to full anyway)
KEY_PREFIX = "neocloud:gateway:rate:"


@dataclass
class _Bucket:
    tokens: float
    at: float
    unsynced: dict | None = None  # wall-clock second -> taken in it, not yet added up in Redis
    synced: dict | None = None  # the same, added up: the last few seconds
    others: float = 0.0  # requests/s the other processes let through, in the last second read back


class RateLimiter:
    def __init__(self, *, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, now: float | None = None, wall: float | None = None) -> tuple[bool, int, float]:
        """Take one request from ``key``'s bucket: (allowed, requests left, seconds until the next one
        is allowed, 0 when allowed)."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(tokens=float(self.burst), at=now, unsynced={}, synced={})
            if len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self._refill(bucket))
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            second = int(time.time() if wall is None else wall)
            bucket.unsynced[second] = bucket.unsynced.get(second, 0) + 1
            return True, int(bucket.tokens), 0.0
        return False, 0, (1.0 - bucket.tokens) / self._refill(bucket)

    def _refill(self, bucket: _Bucket) -> float:
        # Never quite nothing: a process whose share the others used up still lets a trickle through.
        return max(self.rate - bucket.others, self.rate * 0.05)

    # --- Sharing between processes ---

    def pending(self) -> dict[str, dict[int, int]]:
        """What each key took since the last sync, by wall-clock second: the caller adds it up in Redis."""
        taken = {}
        for key, bucket in self._buckets.items():
            if bucket.unsynced:
                taken[key], bucket.unsynced = bucket.unsynced, {}
                for second, count in taken[key].items():
                    bucket.synced[second] = bucket.synced.get(second, 0) + count
        return taken

    def learn(self, key: str, second: int, total: int) -> None:
        """``total``: what every process let through for ``key`` in the wall-clock ``second``."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return
        bucket.others = max(0.0, float(total - bucket.synced.get(second, 0)))
        for old in [s for s in bucket.synced if s < second]:
            del bucket.synced[old]

    def shared_keys(self) -> list[str]:
        """Keys to read back: those this process let something through for lately, or held back for."""
        return [key for key, bucket in self._buckets.items() if bucket.synced or bucket.others]


async def limits_sync(limiter: RateLimiter, client, now: float | None = None) -> None:
    """One sync with Redis (``client``: redis.asyncio): add this process's takings to the per-second
    counters, and read back the totals of the second before last -- complete by now, since every
    process syncs about once a second."""
    settled = int(time.time() if now is None else now) - 2
    taken = limiter.pending()
    keys = limiter.shared_keys()
    if not taken and not keys:
        return
    pipe = client.pipeline(transaction=False)
    writes = 0
    for key, seconds in taken.items():
        for second, count in seconds.items():
            name = f"{KEY_PREFIX}{key}:{second}"
            pipe.incrby(name, count)
            pipe.expire(name, 10)
            writes += 2
    for key in keys:
        pipe.get(f"{KEY_PREFIX}{key}:{settled}")
    results = await pipe.execute()
    for key, total in zip(keys, results[writes:], strict=True):
        limiter.learn(key, settled, int(total or 0))

"""The gateway's per-key limits (console.gateway.limits): a token bucket per key, shared out between the
gateway processes through Redis. Clocks are given, so nothing here waits."""

import asyncio

import pytest
import redis.asyncio
from django.conf import settings

from console.gateway.limits import KEY_PREFIX, RateLimiter, limits_sync


def admitted(limiter: RateLimiter, key: str, *, start: float, seconds: float, per_second: int) -> int:
    """Requests let through out of ``per_second`` a second, evenly spread, from ``start`` (wall = mono)."""
    count, step = 0, 1.0 / per_second
    for i in range(int(seconds * per_second)):
        at = start + i * step
        count += limiter.take(key, now=at, wall=at)[0]
    return count


def test_a_burst_then_the_rate_and_when_to_come_back():
    limiter = RateLimiter(rate=2, burst=3)
    assert [limiter.take("k", now=0.0)[0] for _ in range(4)] == [True, True, True, False]
    allowed, left, wait = limiter.take("k", now=0.0)
    assert not allowed and left == 0 and wait == pytest.approx(0.5)
    assert limiter.take("k", now=0.5)[0] and not limiter.take("k", now=0.5)[0]
    assert limiter.take("other", now=0.5)[0]  # per key


@pytest.mark.parametrize("bad", [{"rate": 0, "burst": 1}, {"rate": 1, "burst": 0}])
def test_a_limit_needs_a_rate_and_a_burst(bad):
    with pytest.raises(ValueError):
        RateLimiter(**bad)


def test_two_processes_sharing_a_keys_traffic_let_through_about_one_rate_together():
    """Two gateways each offered 50 requests/s of one key with a limit of 10/s: alone each would let 10/s
    through (20 together); synced through Redis every second, together they let about 10/s through."""

    async def run() -> tuple[int, int]:
        client = redis.asyncio.Redis.from_url(settings.REDIS_URL)
        keys = await client.keys(f"{KEY_PREFIX}shared:*")
        if keys:
            await client.delete(*keys)
        synced, alone = [RateLimiter(rate=10, burst=10) for _ in range(2)], [RateLimiter(rate=10, burst=10)] * 1
        start, total_synced, total_alone = 1_000_000.0, 0, 0
        for second in range(20):
            at = start + second
            for limiter in synced:
                total_synced += admitted(limiter, "shared", start=at, seconds=1, per_second=50)
                await limits_sync(limiter, client, now=at + 1)
            total_alone += admitted(alone[0], "alone", start=at, seconds=1, per_second=50)
        await client.aclose()
        return total_synced, total_alone

    together, one = asyncio.run(run())
    assert 190 <= one <= 215  # one process: 10/s and its first burst
    assert together <= one * 1.35  # not the 2x two unsynced processes would let through

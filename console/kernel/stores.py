"""One synchronous Redis client per process for the console's own keys (the gateways' traffic batches
and concurrency, read by the workers): made on first use, its connection pool reused by every call
after -- beat's collectors run every few seconds and should not open a connection each time. Channels
and Celery keep clients of their own."""

import redis
from django.conf import settings

_client: redis.Redis | None = None


def redis_client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
    return _client

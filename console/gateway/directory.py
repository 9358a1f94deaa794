"""What the gateway knows of keys and endpoints, read from the database through the marketplace's
selectors and cached in the process.

An entry is fresh for ``ttl`` seconds; in its second half the next use refreshes it in the background
(the request goes on with the cached answer), so a key or endpoint in steady use never waits for the
database, and an entry past ``ttl`` is never used: a revoked key, a removed member or a replica gone
away is seen within ``ttl`` seconds. Concurrent misses of one key share a single lookup. Lookups run on
a small thread pool of their own (the ORM is synchronous), never on the event loop.
"""

import asyncio
import hashlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from console.kernel.tokens import parse
from marketplace.selectors.endpoints import endpoint_routes
from marketplace.selectors.tenancy import tenant_context_for_api_key
from marketplace.services.endpoints.replicas import replica_secret
from marketplace.services.tenancy.api_keys import InvalidApiKey, api_key_authenticate

logger = logging.getLogger(__name__)

MAX_ENTRIES = 20_000
EJECT_SECONDS = 5.0  # a replica that refused or dropped a connection is passed over this long


@dataclass(frozen=True)
class Grant:
    """A live API key, as the gateway needs it."""

    key_id: str
    prefix: str
    organization_id: str
    organization: str  # its slug, the models' owned_by
    expires_at: float | None  # epoch seconds; checked on every request, cached or not


@dataclass
class Target:
    """A ready replica. One object per replica for the life of the process, so its count of requests
    in flight survives the refreshes of its endpoint's route."""

    id: str
    address: str
    secret: bytes
    outstanding: int = 0
    ejected_until: float = 0.0


@dataclass(frozen=True)
class Route:
    endpoint_id: str
    name: str
    state: str
    created: int
    targets: tuple[Target, ...] = field(default_factory=tuple)

    def choose(self, exclude: set[str]) -> Target | None:
        """Power of two choices by requests in flight, among replicas not tried yet and not ejected
        (ejected ones only when nothing else is left)."""
        now = time.monotonic()
        candidates = [t for t in self.targets if t.id not in exclude and t.ejected_until <= now]
        if not candidates:
            candidates = [t for t in self.targets if t.id not in exclude]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = random.sample(candidates, 2)  # noqa: S311 - load balancing, not security
        return first if first.outstanding <= second.outstanding else second


class _Cache:
    """``key -> value`` with freshness, background refresh in its second half, single-flight loads.
    ``load(argument)`` computes a value (in a thread); the argument is kept for the refreshes."""

    def __init__(self, ttl: float, load: Callable[[Any], Any], run: Callable) -> None:
        self.ttl = ttl
        self._load = load
        self._run = run
        self._entries: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._loading: dict[Any, asyncio.Future] = {}

    async def get(self, key: Any, argument: Any, *, max_age: float | None = None) -> Any:
        """The value; ``max_age`` (below the TTL) asks for one no older than that."""
        entry = self._entries.get(key)
        if entry is not None:
            age = time.monotonic() - entry[0]
            if age < (self.ttl if max_age is None else min(self.ttl, max_age)):
                if age > self.ttl / 2 and key not in self._loading:
                    self._start(key, argument)
                return entry[1]
        loading = self._loading.get(key) or self._start(key, argument)
        return await asyncio.shield(loading)

    def _start(self, key: Any, argument: Any) -> asyncio.Future:
        started = time.monotonic()
        task = asyncio.ensure_future(self._run(self._load, argument))
        self._loading[key] = task

        def settle(task: asyncio.Future) -> None:
            self._loading.pop(key, None)
            if task.cancelled():
                return
            if task.exception() is not None:
                logger.error("A gateway lookup failed: %r", task.exception())
                return
            self._entries[key] = (started, task.result())
            self._entries.move_to_end(key)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)

        task.add_done_callback(settle)
        return task


def _reconnecting(function: Callable, argument: Any) -> Any:
    """``function(argument)`` on this thread's database connection, kept open between lookups; once
    more on a new one when the database dropped it (a restart, an idle timeout)."""
    try:
        return function(argument)
    except (OperationalError, InterfaceError):
        connection.close()
        return function(argument)


def _grant(raw_key: str) -> Grant | None:
    try:
        key = api_key_authenticate(raw_key=raw_key)
    except InvalidApiKey:
        return None
    if tenant_context_for_api_key(key=key) is None:  # its creator left the organization
        return None
    return Grant(
        key_id=str(key.pk),
        prefix=key.prefix,
        organization_id=str(key.organization_id),
        organization=key.organization.slug,
        expires_at=key.expires_at.timestamp() if key.expires_at else None,
    )


class Directory:
    def __init__(self, *, auth_ttl: float | None = None, routes_ttl: float | None = None, threads: int = 4) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gateway-db")
        self._targets: dict[str, dict[str, Target]] = {}  # organization -> its ready replicas, by id
        self._keys = _Cache(
            settings.GATEWAY_AUTH_CACHE_SECONDS if auth_ttl is None else auth_ttl, self._lookup_key, self._in_thread
        )
        self._routes = _Cache(
            settings.GATEWAY_ROUTES_CACHE_SECONDS if routes_ttl is None else routes_ttl,
            self._lookup_routes,
            self._in_thread,
        )

    async def _in_thread(self, function: Callable, argument: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, _reconnecting, function, argument)

    # Keys

    async def grant(self, raw_key: str) -> Grant | None:
        """The live key for ``raw_key``, or None. A malformed key is refused without a lookup."""
        if parse(raw_key, settings.API_KEY_PREFIX) is None:
            return None
        # The cache's key is a digest: no plaintext key is held longer than the lookup that needs it.
        grant = await self._keys.get(hashlib.sha256(raw_key.encode()).digest(), raw_key)
        if grant is not None and grant.expires_at is not None and grant.expires_at <= time.time():
            return None
        return grant

    @staticmethod
    def _lookup_key(raw_key: str) -> Grant | None:
        return _grant(raw_key)

    # Routes

    async def routes(self, organization_id: str, *, max_age: float | None = None) -> dict[str, Route]:
        return await self._routes.get(organization_id, organization_id, max_age=max_age)

    def _lookup_routes(self, organization_id: str) -> dict[str, Route]:
        routes = {}
        known, current = self._targets.get(organization_id, {}), {}
        for endpoint in endpoint_routes(organization_id=organization_id):
            targets = []
            for replica in endpoint["replicas"]:
                target = known.get(replica["id"])
                if target is None or target.address != replica["address"]:
                    target = Target(
                        id=replica["id"], address=replica["address"], secret=replica_secret(replica["id"]).encode()
                    )
                current[replica["id"]] = target
                targets.append(target)
            routes[endpoint["name"]] = Route(
                endpoint_id=endpoint["id"],
                name=endpoint["name"],
                state=endpoint["state"],
                created=endpoint["created"],
                targets=tuple(targets),
            )
        self._targets[organization_id] = current  # replicas no longer ready are forgotten with the routes
        return routes

    def eject(self, target: Target) -> None:
        target.ejected_until = time.monotonic() + EJECT_SECONDS

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

"""The gateway: OpenAI's API in front of every tenant's endpoints (docs/gateway.md).

A plain ASGI application, run as processes of its own (``console.gateway.asgi``; the launcher starts
one) and mounted at ``/v1/`` of the console's own ASGI server. For each request: the API key (cached,
console.gateway.directory), the key's rate limit, the endpoint the body's ``model`` names among the
key's organization's own (any other name is ``404 model_not_found``, whether or not another tenant has
it), a ready replica by power of two choices on requests in flight, the request sent there with the
replica's secret and retried on another replica while no byte of the answer has come back, and the
answer streamed back as it comes. Every answer is counted for the endpoint (TrafficCounter, handed to
Redis about once a second); errors are OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``.
"""

import asyncio
import logging
import math
import time
import uuid

import redis.asyncio
from django.conf import settings

from console.gateway.directory import Directory, Grant, Route
from console.gateway.limits import RateLimiter, limits_sync
from console.gateway.upstream import PAUSE_BUFFERED_BYTES, Pool, UpstreamBroken, UpstreamUnavailable
from marketplace.models import WAKING_STATES
from marketplace.services.endpoints.concurrency import ConcurrencyMeter, concurrency_add
from marketplace.services.endpoints.traffic import TRAFFIC_KEY, TrafficCounter
from provisioning.agent.serving.openai_http import (
    ApiError,
    Receive,
    Scope,
    Send,
    json_answer,
    json_object,
    read_body,
    send_answer,
)

logger = logging.getLogger(__name__)


SECRET_HEADER = b"x-neocloud-replica-secret"
TOKENS_HEADER = b"x-neocloud-input-tokens"  # the model server's count of the request's input tokens
REPLICA_HEADER = b"x-neocloud-replica"
# Request headers a replica is given (the rest -- the key above all -- stays at the gateway).
FORWARDED = frozenset({b"content-type", b"accept", b"user-agent", b"x-request-id"})
# Answer headers that describe the replica's connection, not the answer; the gateway's server sets its own.
NOT_RELAYED = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"date", b"server", TOKENS_HEADER, b"content-length"}
)
NOT_READY_RETRY_AFTER = 5  # seconds, while an endpoint deploys
WAKE_POLL_SECONDS = 0.25  # how often a request held for a cold start looks for a ready replica
# An answer whose declared length is at most this is relayed in one piece, once all of it is in, rather
# than streamed (chunked): the size at which reading from a replica pauses anyway (upstream.py).
WHOLE_BODY_BYTES = PAUSE_BUFFERED_BYTES
MAX_PENDING_BATCHES = 600  # traffic batches kept while Redis is unreachable (ten minutes at one a second)


def _database_away(what: str) -> ApiError:
    """The database does not answer: say so and when to come back, never fail open."""
    return ApiError(
        503,
        f"The gateway cannot {what} right now; retry shortly.",
        type="server_error",
        code="service_unavailable",
        headers=((b"retry-after", b"1"),),
    )


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else None
    return None


class Gateway:
    def __init__(
        self,
        *,
        directory: Directory | None = None,
        limiter: RateLimiter | None = None,
        counter: TrafficCounter | None = None,
    ) -> None:
        self.directory = directory or Directory()
        self.limiter = limiter or RateLimiter(
            rate=settings.GATEWAY_KEY_REQUESTS_PER_SECOND, burst=settings.GATEWAY_KEY_BURST
        )
        self.counter = counter or TrafficCounter()
        self.concurrency = ConcurrencyMeter()
        self._in_flight: dict[str, int] = {}  # per API key, at this process
        self._pools: dict[str, Pool] = {}
        self._flusher: asyncio.Task | None = None
        self._pending: list[bytes] = []
        self._redis: redis.asyncio.Redis | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # a WebSocket: not answered, the server closes it
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever(), name="gateway traffic")
        try:
            await self._handle(scope, receive, send)
        except ApiError as error:
            await send_answer(send, *json_answer(error.status, error.body, error.headers))

    # --- One request ---

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        if path in ("/healthz", "/v1/healthz"):
            await send_answer(send, *json_answer(200, {"status": "ok"}))
            return
        if not path.startswith("/v1/"):
            raise ApiError(404, f"Invalid URL ({method} {path}): the gateway answers under /v1/.")
        grant = await self._authenticate(scope)
        self._limit(grant)
        routes = await self._routes(grant)
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if method != "GET":
                raise ApiError(405, f"{path} takes GET, not {method}.")
            await send_answer(send, *self._models(grant, routes, path.removeprefix("/v1/models").strip("/")))
            return
        if method != "POST":
            raise ApiError(405, f"{path} takes POST, not {method}.")
        # A key's requests in flight are bounded before its body is read: held requests (a cold start, a
        # slow replica) keep their bodies, and a tenant must not be able to fill the gateway's memory.
        held = self._in_flight.get(grant.key_id, 0)
        if held >= settings.GATEWAY_KEY_MAX_IN_FLIGHT:
            raise ApiError(
                429,
                f"API key {grant.prefix}… has {held} requests in flight at this gateway, its limit; wait for some "
                "to finish.",
                type="requests",
                code="too_many_requests_in_flight",
                headers=((b"retry-after", b"1"),),
            )
        self._in_flight[grant.key_id] = held + 1
        try:
            await self._proxy(grant, routes, scope, receive, send, started)
        finally:
            left = self._in_flight.pop(grant.key_id, 1) - 1
            if left:
                self._in_flight[grant.key_id] = left

    async def _proxy(self, grant: Grant, routes, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        body = await read_body(scope, receive, settings.GATEWAY_MAX_BODY_BYTES, who="the gateway")
        model = _model_of(body)
        route = routes.get(model)
        if route is None:
            raise ApiError(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        self.concurrency.begin(route.endpoint_id)  # in flight from now: a wait for a cold start counts too
        try:
            if not route.targets and route.state in WAKING_STATES:
                route = await self._wake(grant, route, started)
            await self._forward(route, scope, body, send, started)
        finally:
            self.concurrency.end(route.endpoint_id)

    async def _wake(self, grant: Grant, route: Route, started: float) -> Route:
        """An idle endpoint (or one waking): hold the request while a replica starts -- its being in flight
        is what the autoscaler wakes the endpoint for -- up to GATEWAY_COLD_START_TIMEOUT_SECONDS."""
        deadline = time.monotonic() + settings.GATEWAY_COLD_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(WAKE_POLL_SECONDS)
            current = (await self._routes(grant, max_age=WAKE_POLL_SECONDS)).get(route.name)
            if current is None or current.endpoint_id != route.endpoint_id:
                return route  # deleted meanwhile: answered as an endpoint with no replica
            if current.targets:
                return current
            route = current
        raise self._unanswered(
            route,
            started,
            f"The endpoint `{route.name}` is starting a replica (from {route.state}) and none answered within "
            f"{settings.GATEWAY_COLD_START_TIMEOUT_SECONDS:g} s; retry in {NOT_READY_RETRY_AFTER} seconds.",
            code="endpoint_waking",
        )

    async def _authenticate(self, scope: Scope) -> Grant:
        raw_key = _bearer(scope)
        if not raw_key:
            raise ApiError(
                401,
                "You didn't provide an API key. Give it in an Authorization header using Bearer auth "
                "(Authorization: Bearer YOUR_KEY); create one in the console under API keys.",
                code="invalid_api_key",
                headers=((b"www-authenticate", b'Bearer realm="gateway"'),),
            )
        try:
            grant = await self.directory.grant(raw_key)
        except Exception:  # noqa: BLE001 - the database is unreachable: say so, do not fail open
            logger.exception("The gateway could not check an API key")
            raise _database_away("check API keys") from None
        if grant is None:
            raise ApiError(
                401,
                "Incorrect API key provided: it is unknown, expired or revoked.",
                code="invalid_api_key",
                headers=((b"www-authenticate", b'Bearer realm="gateway"'),),
            )
        return grant

    def _limit(self, grant: Grant) -> None:
        allowed, _remaining, wait = self.limiter.take(grant.key_id)
        if not allowed:
            limit = f"{self.limiter.rate:g}"
            raise ApiError(
                429,
                f"Rate limit reached for API key {grant.prefix}…: {limit} requests a second "
                f"(bursts of {self.limiter.burst}). Retry after {max(wait, 0.01):.2f} s.",
                type="requests",
                code="rate_limit_exceeded",
                headers=(
                    (b"retry-after", str(max(1, math.ceil(wait))).encode()),
                    (b"x-ratelimit-limit-requests", limit.encode()),
                    (b"x-ratelimit-remaining-requests", b"0"),
                ),
            )

    async def _routes(self, grant: Grant, *, max_age: float | None = None) -> dict[str, Route]:
        try:
            return await self.directory.routes(grant.organization_id, max_age=max_age)
        except Exception:  # noqa: BLE001 - the database is unreachable
            logger.exception("The gateway could not read the endpoints of %s", grant.organization)
            raise _database_away("read endpoints") from None

    def _models(self, grant: Grant, routes: dict[str, Route], name: str):
        def model(route: Route) -> dict:
            return {"id": route.name, "object": "model", "created": route.created, "owned_by": grant.organization}

        if name:
            route = routes.get(name)
            if route is None or not route.targets:
                raise ApiError(
                    404, f"The model `{name}` does not exist or you do not have access to it.", code="model_not_found"
                )
            return json_answer(200, model(route))
        return json_answer(200, {"object": "list", "data": [model(r) for r in routes.values() if r.targets]})

    # --- To a replica and back ---

    async def _forward(self, route: Route, scope: Scope, body: bytes, send: Send, started: float) -> None:
        path = scope.get("raw_path") or scope["path"].encode()
        headers = [(name, value) for name, value in scope["headers"] if name in FORWARDED]
        request_id = next((value for name, value in headers if name == b"x-request-id"), None)
        if request_id is None:
            request_id = uuid.uuid4().hex.encode()
            headers.append((b"x-request-id", request_id))
        tried: set[str] = set()
        for _attempt in range(1 + max(0, settings.GATEWAY_RETRIES)):
            target = route.choose(tried)
            if target is None:
                break
            tried.add(target.id)
            pool = self._pools.get(target.address)
            if pool is None:
                pool = self._pools[target.address] = Pool(target.address)
            target.outstanding += 1
            try:
                try:
                    response, connection = await pool.request(
                        b"POST",
                        path,
                        [*headers, (SECRET_HEADER, target.secret)],
                        body,
                        connect_timeout=settings.GATEWAY_CONNECT_TIMEOUT_SECONDS,
                        head_timeout=settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS,
                    )
                except UpstreamUnavailable as error:
                    self.directory.eject(target)
                    logger.warning("Replica %s of %s: %s; trying another", target.id[:8], route.name, error)
                    continue
                relayed = [(name, value) for name, value in response.headers if name not in NOT_RELAYED]
                relayed += [(REPLICA_HEADER, target.id.encode()), (b"x-request-id", request_id)]
                try:
                    answer = await response.whole_body_within(WHOLE_BODY_BYTES)
                except UpstreamBroken as error:  # nothing sent to the client yet: it gets an error it can read
                    connection.close()
                    self._record(route, target.id, 502, started, 0)
                    raise ApiError(
                        502,
                        f"The replica's answer broke off ({error}); retry.",
                        type="server_error",
                        code="upstream_broken",
                    ) from None
                try:
                    await self._relay(response, answer, relayed, send)
                except UpstreamBroken:
                    connection.close()
                    self._record(route, target.id, 502, started, 0)
                    raise
                pool.release(connection)
                tokens = response.header(TOKENS_HEADER)
                self._record(route, target.id, response.status, started, int(tokens) if tokens else 0)
                return
            finally:
                target.outstanding -= 1
        if not route.targets:
            raise self._unanswered(
                route,
                started,
                f"The endpoint `{route.name}` has no replica ready yet (it is {route.state}); "
                f"retry in {NOT_READY_RETRY_AFTER} seconds.",
                code="endpoint_not_ready",
            )
        raise self._unanswered(
            route,
            started,
            f"No replica of `{route.name}` could take the request ({len(tried)} tried); retry shortly.",
            code="replicas_unavailable",
            retry_after=1,
        )

    def _unanswered(
        self, route: Route, started: float, message: str, *, code: str, retry_after: int = NOT_READY_RETRY_AFTER
    ) -> ApiError:
        """No replica took the request: counted for the endpoint, and a 503 saying when to come back."""
        self._record(route, None, 503, started, 0)
        return ApiError(
            503, message, type="server_error", code=code, headers=((b"retry-after", str(retry_after).encode()),)
        )

    async def _relay(self, response, body: bytes | None, headers: list[tuple[bytes, bytes]], send: Send) -> None:
        """The answer to the client: in one piece, with its length, when ``body`` is all of it (the usual
        case for an embedding), else streamed chunk by chunk as the replica sends it."""
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
            await send_answer(send, response.status, headers, body)
            return
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        async for chunk in response.body():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    def _record(self, route: Route, replica_id: str | None, status: int, started: float, tokens: int) -> None:
        self.counter.record(
            endpoint_id=route.endpoint_id,
            replica_id=replica_id,
            status=status,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            input_tokens=tokens,
        )

    # --- Counts to Redis, start and stop ---

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.GATEWAY_FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        """Hand what was counted to Redis (kept, up to MAX_PENDING_BATCHES, while Redis cannot take it),
        add the second's requests in flight per endpoint (the autoscaler's signal), and share the keys'
        rate limits with the other gateway processes."""
        batch = self.counter.batch()
        if batch is not None:
            self._pending.append(batch)
        readings = self.concurrency.read()
        try:
            if self._redis is None:
                self._redis = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
            if self._pending or readings:
                pipe = self._redis.pipeline(transaction=False)
                if self._pending:
                    pipe.rpush(TRAFFIC_KEY, *self._pending)
                concurrency_add(pipe, readings)
                await pipe.execute()
                self._pending.clear()
            await limits_sync(self.limiter, self._redis)
        except Exception:  # noqa: BLE001 - Redis away: keep the batches, try again next time
            logger.exception("The gateway could not reach Redis (%d traffic batch(es) kept)", len(self._pending))
            del self._pending[:-MAX_PENDING_BATCHES]

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._flusher is not None:
                    self._flusher.cancel()
                await self.flush()
                for pool in self._pools.values():
                    pool.close()
                self.directory.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _model_of(body: bytes) -> str:
    model = json_object(body).get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be given: the name of one of your endpoints.", param="model")
    return model

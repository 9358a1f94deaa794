"""HTTP/1.1 to replicas: kept-alive connections per replica, responses parsed by httptools (the C
parser uvicorn uses), bodies streamed back as they arrive.

Purpose-built rather than a general client because the gateway's budget is a millisecond and because
it must know one thing exactly: whether any byte of the answer has come back. ``UpstreamUnavailable``
means none did (connection refused or reset, the replica closed it, no status line in time), so the
caller may try another replica; once the status line is in, a failure is the client's to see.
"""

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

import httptools

# A kept-alive connection idle longer than this is closed rather than reused: uvicorn, the replicas'
# server, closes idle connections after 5 s, and a request written into that closing is a lost race.
IDLE_REUSE_SECONDS = 4.0
MAX_IDLE_PER_REPLICA = 256
# Reading from a replica pauses while this much of its answer waits for a slow client.
PAUSE_BUFFERED_BYTES = 1 << 20


class UpstreamUnavailable(Exception):
    """No byte of the answer came back: the request may be sent to another replica."""


class UpstreamBroken(Exception):
    """The answer stopped part way (after its status line): it cannot be retried."""


class Response:
    """One answer from a replica: ``status`` and ``headers`` once ``head`` is done, then ``body()``."""

    __slots__ = ("status", "headers", "head", "_chunks", "_buffered", "_waiter", "_complete", "_error", "_connection")

    def __init__(self, connection: "_Connection") -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = connection.loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: Exception | None = None
        self._connection = connection

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)

    def whole_body(self) -> bytes | None:
        """The body when all of it is in already (the usual case for an embedding), else None."""
        if not self._complete or self._error is not None:
            return None
        body, self._chunks, self._buffered = b"".join(self._chunks), deque(), 0
        return body

    async def whole_body_within(self, limit: int) -> bytes | None:
        """The whole body when all of it is in already, or when the replica declared a length of at most
        ``limit`` bytes (waiting for the rest); None when it is to be streamed. Raises UpstreamBroken if
        the body stops short. The replica's server writes an answer's head and its body apart, so the
        head is often here first even for a small answer."""
        if self._complete:
            return self.whole_body()
        declared = self.header(b"content-length")
        if declared is None or not declared.isdigit() or int(declared) > limit:
            return None
        return b"".join([chunk async for chunk in self.body()])

    async def body(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (de-chunked); raises UpstreamBroken if it stops short."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered < PAUSE_BUFFERED_BYTES:
                    self._connection.resume()
                yield chunk
                continue
            if self._complete:
                return
            if self._error is not None:
                raise self._error
            self._waiter = self._connection.loop.create_future()
            await self._waiter

    # Called by the connection's parser:

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= PAUSE_BUFFERED_BYTES:
            self._connection.pause()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        if not self.head.done():
            self.head.set_exception(UpstreamUnavailable(str(error)))
        self._error = UpstreamBroken(str(error))
        self._wake()


class _Connection(asyncio.Protocol):
    """One kept-alive connection to a replica; one request at a time (no pipelining)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self._paused = False

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._abort(f"the replica's answer is not HTTP/1.1: {error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None and not self.response._complete:
            self.response._fail(exc or ConnectionResetError("the replica closed the connection"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self.response
        if response is not None and not response.head.done():
            response.status = self.parser.get_status_code()
            response.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._push(bytes(body))

    def on_message_complete(self) -> None:
        response = self.response
        self.reusable = self.parser.should_keep_alive() and not self.closed
        if response is not None:
            response._finish()

    # Ours

    def send(self, head: bytes, body: bytes) -> Response:
        self.response = Response(self)
        self.reusable = False
        assert self.transport is not None
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self.response

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def _abort(self, reason: str) -> None:
        if self.response is not None:
            self.response._fail(ConnectionError(reason))
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Connections to one replica (``host:port``)."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"not a host:port address: {address!r}")
        self.host, self.port = host.strip("[]"), int(port)
        self.authority = address.encode("latin-1")
        self._idle: deque[_Connection] = deque()

    async def _connection(self, connect_timeout: float) -> _Connection:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the least likely to be closing
            if not connection.closed and now - connection.idle_since < IDLE_REUSE_SECONDS:
                return connection
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _transport, connection = await loop.create_connection(lambda: _Connection(loop), self.host, self.port)
        except (OSError, TimeoutError) as error:
            raise UpstreamUnavailable(f"cannot connect to {self.host}:{self.port}: {error}") from None
        return connection

    async def request(
        self,
        method: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        connect_timeout: float,
        head_timeout: float,
    ) -> tuple[Response, "_Connection"]:
        """Send one request and wait for the answer's status line and headers. UpstreamUnavailable when
        none came back (the connection is closed then); else the response, whose body the caller reads
        and then hands the connection back (``release``)."""
        connection = await self._connection(connect_timeout)
        lines = [method, b" ", path, b" HTTP/1.1\r\nhost: ", self.authority, b"\r\n"]
        for name, value in headers:
            lines += [name, b": ", value, b"\r\n"]
        lines += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n"]
        response = connection.send(b"".join(lines), body)
        try:
            async with asyncio.timeout(head_timeout):
                await response.head
        except TimeoutError:
            connection.close()
            raise UpstreamUnavailable(f"no answer from {self.host}:{self.port} in {head_timeout:g} s") from None
        except UpstreamUnavailable:
            connection.close()
            raise
        except asyncio.CancelledError:
            connection.close()
            raise
        return response, connection

    def release(self, connection: _Connection) -> None:
        """After the body was read to its end: keep the connection for the next request, or close it."""
        if connection.reusable and not connection.closed and len(self._idle) < MAX_IDLE_PER_REPLICA:
            connection.response = None
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

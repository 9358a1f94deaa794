#!/usr/bin/env python
"""The load of bench/autoscale.py: closed-loop clients sending ``POST /v1/embeddings`` to the gateway,
each on its own kept-alive HTTP/1.1 connection, one request at a time, the next as soon as the answer
is in (the API key from LOAD_API_KEY). A process of its own (asyncio on uvloop, plain sockets, no HTTP
library: a few tens of microseconds of CPU a request), so the bench's own polling never delays one.

Driven through stdin, one command a line, each acknowledged on stdout:

    clients N     run N clients from now (more are started; the extra ones stop after their request)
    stop          let every client finish its request, then exit

Every request is written to ``--log`` as ``start answered_ms status`` (wall-clock seconds, so the bench
can put it beside the database's timestamps; status 0 is a connection failure or a timeout), and the
first failures' words go to stderr. Imports nothing of the project.
"""

import argparse
import asyncio
import json
import os
import sys
import time

try:
    import uvloop
except ImportError:  # the plain loop works too, a little dearer a request
    uvloop = None

FAILURES_SHOWN = 20
KEY_ENV = "LOAD_API_KEY"  # the API key, from the environment: a command line is every user's to read


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.host, _, port = args.address.rpartition(":")
        self.port = int(port)
        body = json.dumps({"model": args.model, "input": args.input, "encoding_format": "float"}).encode()
        self.request = (
            f"POST /v1/embeddings HTTP/1.1\r\nhost: {args.address}\r\nauthorization: Bearer {os.environ[KEY_ENV]}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.timeout = args.timeout
        self.log = open(args.log, "w", buffering=1 << 16)  # noqa: SIM115 - closed at the end of run()
        self.clients: list[tuple[asyncio.Task, asyncio.Event]] = []
        self.failures = 0

    async def _connect(self):
        return await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout)

    async def _one(self, connection) -> tuple[int, object]:
        """One request on ``connection`` (made when None); (status, the connection to reuse or None)."""
        if connection is None:
            connection = await self._connect()
        reader, writer = connection
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = None, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and value == b"close":
                close = True
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length is not None:
            await reader.readexactly(length)
        else:
            await reader.read()
            close = True
        if close:
            writer.close()
            return status, None
        return status, connection

    async def _client(self, stop: asyncio.Event) -> None:
        connection = None
        while not stop.is_set():
            started = time.time()
            clock = time.perf_counter()
            try:
                status, connection = await asyncio.wait_for(self._one(connection), self.timeout)
                error = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
                status, error = 0, exc
                if connection is not None:
                    connection[1].close()
                connection = None
            self.log.write(f"{started:.6f} {(time.perf_counter() - clock) * 1000:.3f} {status}\n")
            if status != 200:
                self.failures += 1
                if self.failures <= FAILURES_SHOWN:
                    print(f"load: request at {started:.3f} answered {status} {error!r}", file=sys.stderr, flush=True)
                if status == 0:
                    await asyncio.sleep(0.05)  # a refused connection is not retried in a tight loop
        if connection is not None:
            connection[1].close()

    def resize(self, count: int) -> None:
        while len(self.clients) < count:
            stop = asyncio.Event()
            self.clients.append((asyncio.get_running_loop().create_task(self._client(stop)), stop))
        while len(self.clients) > count:
            _task, stop = self.clients.pop()
            stop.set()  # it finishes the request it is in; stop waits for every task

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        stopped: list[asyncio.Task] = []
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "stop":
                break
            command, _, value = line.partition(" ")
            if command != "clients" or not value.isdigit():
                print(f"error unknown command {line!r}", flush=True)
                continue
            before = [task for task, _ in self.clients]
            self.resize(int(value))
            stopped += [task for task in before if task not in {t for t, _ in self.clients}]
            print(f"ok {len(self.clients)} {time.time():.6f}", flush=True)
        stopped += [task for task, _ in self.clients]
        self.resize(0)
        await asyncio.gather(*stopped, return_exceptions=True)
        self.log.close()
        print(f"done {self.failures}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the gateway's host:port")
    parser.add_argument("--model", required=True, help="the endpoint's name")
    parser.add_argument("--input", default="load", help="the text embedded")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds a request may take (150)")
    parser.add_argument("--log", required=True, help="where every request is written")
    args = parser.parse_args(argv)
    if KEY_ENV not in os.environ:
        parser.error(f"{KEY_ENV} must hold the API key")
    (uvloop.run if uvloop is not None else asyncio.run)(Load(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

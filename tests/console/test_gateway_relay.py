"""How the gateway relays a replica's answer (console.gateway.app ``_forward``, console.gateway.upstream):
in one piece with its length when the replica declared one, even when the head came first; streamed when
it did not; and a readable error, not a cut-off answer, when the body stops short before anything was
sent on.

The replica here is a scripted HTTP/1.1 server on a real loopback socket: the model server (uvicorn)
writes an answer's head and its body in two writes, so whether the gateway reads them apart is a race
there (bench/gateway.py saw it for a third of the answers); the script makes it certain."""

import asyncio
import json

import pytest

from console.gateway.app import ApiError, Gateway
from console.gateway.directory import Route, Target

BODY = json.dumps({"object": "list", "data": [{"embedding": [0.5] * 384}]}).encode()


async def scripted_replica(parts: list[bytes | float]):
    """A server that reads one request and answers with ``parts``: bytes are written, a float is a pause
    (seconds) between writes; then it closes the connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        for part in parts:
            if isinstance(part, float):
                await asyncio.sleep(part)
            else:
                writer.write(part)
                await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def forward(parts: list[bytes | float]) -> tuple[list[dict], Gateway]:
    """One request through the gateway's relay to the scripted replica: what the client was sent."""
    server = await scripted_replica(parts)
    port = server.sockets[0].getsockname()[1]
    gateway = Gateway()
    route = Route(
        endpoint_id="e1",
        name="embed",
        state="ready",
        created=0,
        targets=(Target(id="r1", address=f"127.0.0.1:{port}", secret=b"secret"),),
    )
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/embeddings",
        "raw_path": b"/v1/embeddings",
        "headers": [(b"content-type", b"application/json")],
    }
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    try:
        await gateway._forward(route, scope, b'{"model": "embed", "input": "x"}', send, 0.0)
    finally:
        for pool in gateway._pools.values():
            pool.close()
        gateway.directory.close()
        server.close()
        await server.wait_closed()
    return sent, gateway


def head(*lines: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def test_an_answer_whose_head_came_first_is_sent_in_one_piece_with_its_length():
    answer = head(b"content-type: application/json", b"content-length: %d" % len(BODY), b"x-neocloud-input-tokens: 3")
    sent, gateway = asyncio.run(forward([answer, 0.05, BODY[:100], 0.02, BODY[100:]]))
    start, *bodies = sent
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-length"] == str(len(BODY)).encode() and b"transfer-encoding" not in headers
    assert [b["body"] for b in bodies] == [BODY] and not bodies[0].get("more_body", False)
    assert b"x-neocloud-input-tokens" not in headers
    batch = json.loads(gateway.counter.batch())
    assert [row[4:6] for row in batch["rows"]] == [[1, 3]]  # one request, its 3 input tokens


def test_an_answer_without_a_length_is_streamed_as_it_comes():
    chunked = head(b"content-type: text/event-stream", b"transfer-encoding: chunked")
    sent, _gateway = asyncio.run(forward([chunked, b"5\r\nhello\r\n", 0.05, b"6\r\n world\r\n0\r\n\r\n"]))
    start, *bodies = sent
    assert b"content-length" not in dict(start["headers"])
    assert b"".join(b["body"] for b in bodies) == b"hello world"
    assert [b.get("more_body", False) for b in bodies] == [True, True, False]


def test_a_body_that_stops_short_before_anything_was_sent_is_a_502_error_not_a_cut_answer():
    answer = head(b"content-type: application/json", b"content-length: %d" % len(BODY))
    with pytest.raises(ApiError) as refused:
        asyncio.run(forward([answer, 0.05, BODY[:100]]))  # then the replica closes the connection
    assert refused.value.status == 502
    assert refused.value.body["error"]["code"] == "upstream_broken"
    assert set(refused.value.body["error"]) == {"message", "type", "param", "code"}

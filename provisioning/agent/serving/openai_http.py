"""OpenAI's HTTP manners over plain ASGI, used by both the model server (serving.app) and the console's
gateway (console.gateway.app), which speak the same API to the same clients: the error body
``{"error": {"message", "type", "param", "code"}}`` the official clients turn into their exceptions, a
JSON answer, and a request body read no further than its limit."""

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}


def json_answer(status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()):
    """(status, headers, payload) of a JSON answer, for ``send_answer``."""
    payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
    return (
        status,
        [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers],
        payload,
    )


async def send_answer(send: Send, status: int, headers: Headers, payload: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def read_body(scope: Scope, receive: Receive, limit: int, *, who: str = "this server") -> bytes:
    """The request's body, refused (413) as soon as it is known to exceed ``limit``: from its declared
    length before reading anything, or while reading a body sent in chunks."""
    too_large = ApiError(
        413, f"The request body is larger than {who}'s limit of {limit} bytes.", code="request_too_large"
    )
    declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "The client closed the connection before sending the whole body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        raise ApiError(400, "We could not parse the JSON body of your request: it must be a JSON object.")
    return request

"""The model server's HTTP side, a plain ASGI application (docs/serving.md has the routes, limits and
errors).

Requests come from the console's gateway only: each carries the replica's secret in a header, compared
in constant time; only the health route answers without it (the agent polls it). Errors are OpenAI's
body, ``{"error": {"message", "type", "param", "code"}}``, so the official clients raise their usual
exceptions. The model loads in a thread after the server listens, so the health route says "loading"
within a second of the start and "ready" once a request can be answered.
"""

import asyncio
import base64
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from provisioning.agent.serving import SECRET_HEADER
from provisioning.agent.serving.batching import MAX_INPUTS, MAX_WAIT_S, MicroBatcher
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


SECRET_HEADER_KEY = SECRET_HEADER.lower().encode("latin-1")  # ASGI gives header names lower-cased
TOKENS_HEADER = b"x-neocloud-input-tokens"
OWNER = "neocloud"


class Encoder(Protocol):
    """A loaded model (encoder.SentenceEncoder)."""

    dimensions: int
    max_tokens: int

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def encode(self, texts: list[str]) -> Any: ...  # one float32 row per text


@dataclass(frozen=True)
class Limits:
    """What one request may ask. Inputs are also refused over the model's own limit in tokens (256 for
    all-MiniLM-L6-v2): the model would silently read only the start of a longer text. The character
    limit only spares the tokenizer a huge input before it is counted."""

    max_inputs: int = 512
    max_input_chars: int = 16_384
    max_body_bytes: int = 2 * 1024 * 1024


class EmbeddingsApp:
    def __init__(
        self,
        *,
        served_name: str,
        secret: str,
        load: Callable[[], Encoder],
        limits: Limits | None = None,
        max_batch_inputs: int = MAX_INPUTS,
        max_batch_wait_s: float = MAX_WAIT_S,
    ) -> None:
        """``load`` builds the model; it runs in a thread once the server listens."""
        if not secret:
            raise ValueError("a replica secret is required")
        self.served_name = served_name
        self._secret = secret.encode("utf-8")
        self._load = load
        self.limits = limits or Limits()
        self._max_batch_inputs = max_batch_inputs
        self._max_batch_wait_s = max_batch_wait_s
        self._encoder: Encoder | None = None
        self._batcher: MicroBatcher | None = None
        self._loading: asyncio.Task[None] | None = None
        self._created = int(time.time())
        self._requests = 0  # answered with vectors
        self.state = "loading"  # then "ready", or "failed" (and the process exits: on_failure)
        self.on_failure: Callable[[], None] = lambda: None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                status, body = await self._route(scope, receive)
            except ApiError as error:
                status, body = error.status, error.body
            await _respond(send, status, body)
        # anything else (a WebSocket) is not answered; the server closes it

    # --- Start and stop ---

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loading = asyncio.create_task(self._load_model(), name="load model")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._loading is not None:
                    self._loading.cancel()
                if self._batcher is not None:
                    await self._batcher.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _load_model(self) -> None:
        started = time.monotonic()
        try:
            encoder = await _in_daemon_thread(self._load)
        except Exception:
            logger.exception("the model did not load; stopping")
            self.state = "failed"
            self.on_failure()
            return
        self._encoder = encoder
        self._batcher = MicroBatcher(
            encoder.encode, max_inputs=self._max_batch_inputs, max_wait_s=self._max_batch_wait_s
        )
        self._batcher.start()
        self.state = "ready"
        logger.info("ready: serving %s, model loaded in %.1f s", self.served_name, time.monotonic() - started)

    # --- Routes ---

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        method, path = scope["method"], scope["path"]
        if path == "/healthz":
            _allow(method, path, "GET", "HEAD")
            return self._health()
        self._authenticate(scope)
        if path == "/v1/embeddings":
            _allow(method, path, "POST")
            return 200, await self._embeddings(scope, receive)
        if path == "/v1/models":
            _allow(method, path, "GET")
            return 200, {"object": "list", "data": [self._model_object()]}
        if path.startswith("/v1/models/"):
            _allow(method, path, "GET")
            self._require_model(path.removeprefix("/v1/models/"), param=None)
            return 200, self._model_object()
        raise ApiError(404, f"Invalid URL ({method} {path})")

    def _health(self) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"status": self.state, "model": self.served_name}
        if self._encoder is not None and self._batcher is not None:
            body["dimensions"] = self._encoder.dimensions
            body["served"] = {
                "requests": self._requests,
                "inputs": self._batcher.inputs,
                "batches": self._batcher.batches,
            }
        return (200 if self.state == "ready" else 503), body

    def _authenticate(self, scope: Scope) -> None:
        given = next((value for name, value in scope["headers"] if name == SECRET_HEADER_KEY), b"")
        if not hmac.compare_digest(given, self._secret):
            raise ApiError(
                401,
                f"This replica answers only requests that come through the gateway (a missing or wrong "
                f"{SECRET_HEADER} header).",
                code="invalid_replica_secret",
            )

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.served_name, "object": "model", "created": self._created, "owned_by": OWNER}

    def _require_model(self, name: Any, *, param: str | None) -> None:
        if name != self.served_name:
            raise ApiError(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                param=param,
                code="model_not_found",
            )

    async def _embeddings(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        request = json_object(await read_body(scope, receive, self.limits.max_body_bytes))
        if not isinstance(request.get("model"), str):
            raise ApiError(400, "model must be given: the name of the model to use.", param="model")
        self._require_model(request["model"], param="model")
        encoder, batcher = self._encoder, self._batcher
        if encoder is None or batcher is None:
            raise ApiError(503, "The model is still loading; retry shortly.", type="server_error", code="model_loading")
        texts = self._inputs(request.get("input"))
        encoding = request.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(
                400, f"encoding_format must be 'float' or 'base64', not {encoding!r}.", param="encoding_format"
            )
        dimensions = request.get("dimensions")
        if dimensions is not None and dimensions != encoder.dimensions:
            raise ApiError(
                400,
                f"This model's embeddings have {encoder.dimensions} dimensions and cannot be shortened "
                f"to {dimensions!r}.",
                param="dimensions",
            )
        tokens = encoder.count_tokens(texts)
        for index, count in enumerate(tokens):
            if count > encoder.max_tokens:
                raise ApiError(
                    400,
                    f"input[{index}] is longer than this model's {encoder.max_tokens} tokens; shorten or split it.",
                    param="input",
                    code="context_length_exceeded",
                )
        try:
            vectors = await batcher.embed(texts)
        except Exception:  # noqa: BLE001 - the batcher logged it; this request answers 500, the server goes on
            raise ApiError(500, "The model failed to embed the input.", type="server_error") from None
        self._requests += 1
        render = _base64 if encoding == "base64" else _floats
        used = sum(tokens)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": render(vector)}
                for index, vector in enumerate(vectors)
            ],
            "model": self.served_name,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }

    def _inputs(self, value: Any) -> list[str]:
        """``input``: a string or a non-empty list of strings (OpenAI's token arrays are not taken: the
        tokens would be another tokenizer's)."""
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
            raise ApiError(400, "input must be a string or a non-empty array of strings.", param="input")
        if len(texts) > self.limits.max_inputs:
            raise ApiError(
                400,
                f"input has {len(texts)} items; this server takes at most {self.limits.max_inputs} per request.",
                param="input",
            )
        for index, text in enumerate(texts):
            if not text:
                raise ApiError(400, f"input[{index}] is empty.", param="input")
            if len(text) > self.limits.max_input_chars:
                raise ApiError(
                    400,
                    f"input[{index}] has {len(text)} characters; this server takes at most "
                    f"{self.limits.max_input_chars} per input.",
                    param="input",
                    code="context_length_exceeded",
                )
        return texts


async def _in_daemon_thread(work: Callable[[], Encoder]) -> Encoder:
    """``work()`` in a thread the interpreter does not wait for at exit: a replica stopped while its
    model loads exits at once instead of after the load."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Encoder] = loop.create_future()

    def settle(result: Encoder | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            outcome = (work(), None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, which logs it
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="load model", daemon=True).start()
    return await done


def _allow(method: str, path: str, *allowed: str) -> None:
    if method not in allowed:
        raise ApiError(405, f"{path} takes {' or '.join(allowed)}, not {method}.")


def _floats(vector: Any) -> list[float]:
    return vector.tolist()


def _base64(vector: Any) -> str:
    """OpenAI's base64 encoding: the float32 values, little-endian, back to back."""
    return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")


async def _respond(send: Send, status: int, body: dict[str, Any]) -> None:
    usage = body.get("usage")
    # The gateway counts tokens from this header instead of parsing every answer.
    headers = [(TOKENS_HEADER, str(usage["prompt_tokens"]).encode())] if usage else []
    await send_answer(send, *json_answer(status, body, headers))

"""Micro-batching: the inputs of requests that arrive together are embedded in one ``encode`` call.

One call over 64 short texts costs little more than one over a single text (the model's matrices are
read once either way), so a worker takes the first waiting request, gathers what else arrives within
``max_wait_s`` (2 ms) or until it holds ``max_inputs`` (64) inputs, and runs one ``encode`` in its own
thread, the event loop answering meanwhile. Only one ``encode`` runs at a time: the replica's torch
threads are all it may use (docs/serving.md), and two calls at once would only share them.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MAX_INPUTS = 64
MAX_WAIT_S = 0.002

Encode = Callable[[list[str]], Sequence[Any]]  # texts -> one vector per text, in order


@dataclass
class _Waiting:
    texts: list[str]
    future: asyncio.Future[list[Any]]


class MicroBatcher:
    def __init__(self, encode: Encode, *, max_inputs: int = MAX_INPUTS, max_wait_s: float = MAX_WAIT_S) -> None:
        if max_inputs < 1 or max_wait_s < 0:
            raise ValueError("max_inputs must be at least 1 and max_wait_s not negative")
        self._encode = encode
        self._max_inputs = max_inputs
        self._max_wait = max_wait_s
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # encode calls so far, and the inputs they embedded (the health route shows them)
        self.inputs = 0

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.wait([self._worker])
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: list[str]) -> list[Any]:
        """The vectors of ``texts``, in order, once a batch holding them has been encoded."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(texts, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            await self._encode_batch(batch)

    async def _gather(self) -> list[_Waiting]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        size = len(batch[0].texts)
        deadline = loop.time() + self._max_wait
        while size < self._max_inputs:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    waiting = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:  # already waiting (they came while the last batch was encoded): no need to wait for them
                waiting = self._queue.get_nowait()
            batch.append(waiting)
            size += len(waiting.texts)
        return batch

    async def _encode_batch(self, batch: list[_Waiting]) -> None:
        batch = [waiting for waiting in batch if not waiting.future.done()]  # a caller that gave up
        if not batch:
            return
        texts = [text for waiting in batch for text in waiting.texts]
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, texts)
        except Exception as exc:  # each request of the batch answers it; the worker goes on
            logger.exception("encoding a batch of %d inputs failed", len(texts))
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        self.batches += 1
        self.inputs += len(texts)
        start = 0
        for waiting in batch:
            end = start + len(waiting.texts)
            if not waiting.future.done():
                waiting.future.set_result(list(vectors[start:end]))
            start = end

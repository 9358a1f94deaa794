"""A model that costs nothing: unit vectors derived from each input's hash, a token per word.

``neocloud-serve --trivial DIMS [--trivial-latency-ms MS]`` serves it through the same HTTP side as a
real model, answering at once (no batching wait; MS of compute a batch if asked): the gateway's own
ceiling in bench/gateway.py, and a replica that starts in a second for tests about the gateway and
the autoscaler, where the model is not the point. Not a model a tenant rents.
"""

import hashlib
import time
from collections.abc import Sequence

import numpy as np


class TrivialEncoder:
    max_tokens = 256

    def __init__(self, dimensions: int, *, latency_s: float = 0.0) -> None:
        """``latency_s``: how long each batch takes, as a model's compute would (0: none). Tests of the
        autoscaler use it so that requests are in flight long enough to be counted."""
        if dimensions < 1 or latency_s < 0:
            raise ValueError("dimensions must be at least 1 and the latency not negative")
        self.dimensions = dimensions
        self.latency_s = latency_s

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) + 2 for text in texts]  # with the two special tokens a real tokenizer adds

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.latency_s:
            time.sleep(self.latency_s)  # in the batcher's own thread, as a model's encode runs
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            row = np.random.default_rng(seed).standard_normal(self.dimensions).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows)

"""A model that costs nothing: unit vectors derived from each input's hash, a token per word.

``neocloud-serve --trivial DIMS`` serves it through the same HTTP side as a real model, answering at
once (no batching wait): the gateway's own ceiling in bench/gateway.py, and a replica that starts in
a second for tests about the gateway, where the model is not the point. Not a model a tenant rents.
"""

import hashlib
from collections.abc import Sequence

import numpy as np


class TrivialEncoder:
    max_tokens = 256

    def __init__(self, dimensions: int) -> None:
        if dimensions < 1:
            raise ValueError("dimensions must be at least 1")
        self.dimensions = dimensions

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(text.split()) + 2 for text in texts]  # with the two special tokens a real tokenizer adds

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            row = np.random.default_rng(seed).standard_normal(self.dimensions).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows)

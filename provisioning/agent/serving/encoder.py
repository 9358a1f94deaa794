"""The model: a sentence-transformers model loaded from a folder on disk (no hub, no download), and the
tokenizer that counts what each input costs.

Importing this module imports torch (seconds, hundreds of MiB): only the model server's loader does,
after its HTTP side already answers the health route with "loading".
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

logger = logging.getLogger(__name__)

ENCODE_BATCH = 64  # inside one encode call; the micro-batcher gathers about as many


def pick_device(device: str) -> str:
    """``auto`` is the GPU the agent left visible to the replica (CUDA_VISIBLE_DEVICES), or the CPU."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceEncoder:
    """What the HTTP side needs of a model: its dimensions, its longest input in tokens, the token
    count of each input, and one float32 vector per input (as the model's own modules make it:
    all-MiniLM-L6-v2 ends with a Normalize module, so its vectors have length 1)."""

    def __init__(self, model_dir: Path, *, threads: int, device: str = "auto") -> None:
        torch.set_num_threads(threads)
        self.device = pick_device(device)
        self._model = SentenceTransformer(str(model_dir), device=self.device, local_files_only=True)
        # A tokenizer of its own for counting: the model's is called with other truncation settings
        # from the encode thread, and a fast tokenizer changed from two threads at once raises.
        self._counter = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.dimensions = int(self._model.get_embedding_dimension())
        self.max_tokens = int(self._model.max_seq_length)
        self.encode(["warm up"])  # the first call allocates; a request should not pay for it
        logger.info(
            "loaded %s on %s: %d dimensions, inputs up to %d tokens, %d torch threads",
            model_dir,
            self.device,
            self.dimensions,
            self.max_tokens,
            torch.get_num_threads(),
        )

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """The tokens the model reads for each text, its special tokens included (what ``usage``
        reports). Counting stops one past the limit: a longer text is refused, not counted on."""
        ids = self._counter(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_tokens + 1)[
            "input_ids"
        ]
        return [len(one) for one in ids]

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(texts, batch_size=ENCODE_BATCH, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

"""One sample's top alternatives per generated token (``SamplingParams.top_logprobs``), kept as arrays.

Each step appends one row of ``k`` token ids (int32) and logprobs (float32) per sample that asks:
8 bytes per alternative per token, in two arrays that grow by doubling up to ``max_new_tokens``
rows. No per-token Python object is made; the finished sample hands out the filled rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NO_TOKEN = -1
"""The id of an alternative that does not exist (after a token the engine forced, not sampled)."""


@dataclass(slots=True, eq=False)
class TopLogprobs:
    """``k`` alternatives per token for up to ``max_rows`` tokens."""

    k: int
    max_rows: int
    size: int = 0
    ids: np.ndarray = field(init=False)
    logprobs: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        rows = min(self.max_rows, 16)
        self.ids = np.empty((rows, self.k), dtype=np.int32)
        self.logprobs = np.empty((rows, self.k), dtype=np.float32)

    def append(self, ids: np.ndarray, logprobs: np.ndarray) -> None:
        """One token's row: the first ``k`` entries of a wider step row (most likely first)."""
        self._reserve(1)
        self.ids[self.size] = ids[: self.k]
        self.logprobs[self.size] = logprobs[: self.k]
        self.size += 1

    def append_forced(self, tokens: list[int]) -> None:
        """Rows for tokens the engine placed itself (a forced end-of-thinking marker): the token with
        logprob 0 (as its ``logprobs`` entry), then ``NO_TOKEN`` with -inf."""
        n = len(tokens)
        self._reserve(n)
        rows = slice(self.size, self.size + n)
        self.ids[rows] = NO_TOKEN
        self.ids[rows, 0] = tokens
        self.logprobs[rows] = -np.inf
        self.logprobs[rows, 0] = 0.0
        self.size += n

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The filled rows, ``[tokens, k]`` each (copies: the buffers may be larger)."""
        return self.ids[: self.size].copy(), self.logprobs[: self.size].copy()

    def _reserve(self, n: int) -> None:
        need = self.size + n
        if need <= len(self.ids):
            return
        rows = min(max(need, 2 * len(self.ids)), max(self.max_rows, need))
        for name in ("ids", "logprobs"):
            old = getattr(self, name)
            new = np.empty((rows, self.k), dtype=old.dtype)
            new[: self.size] = old[: self.size]
            setattr(self, name, new)

"""The loop's side of constrained decoding: one grammar matcher per constrained sample, advanced with each of
its tokens, and the token masks of a step's constrained rows, filled on the CPU."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.guided.compiler import GrammarCompiler
from engine.sampling_params import SamplingParams


def fill_threads() -> int:
    """Threads that fill a step's masks: half this process's cores (the loop and the tokenizer keep the rest), 1 to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


@dataclass(slots=True, eq=False)
class Guide:
    """A sample's matcher: the constraint's state after the sample's known output tokens."""

    matcher: Any
    usable: np.ndarray
    """The tokens this kind of constraint may use at all (int32 bitmask words), ANDed into every mask."""

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False if the constraint does not allow it."""
        return bool(self.matcher.accept_token(token))


class GuidedDecoder:
    """Compiles constraints (cached), starts a matcher per sample and fills the masks of a step's rows.

    Built on the first constrained request; ``fill_s`` and ``rows_filled`` add up the mask work.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, sorted(stop_ids))
        xgr = self.compiler.xgr
        self._matcher_cls = xgr.GrammarMatcher
        self._batch = xgr.BatchGrammarMatcher(max_threads=fill_threads())
        self._usable = {json_text: self.compiler.usable_tokens(json_text) for json_text in (False, True)}
        self.live = 0
        """Samples with a matcher that have not finished: while 0, the loop skips constrained decoding."""
        self.fill_s = 0.0
        self.rows_filled = 0

    def compile(self, params: SamplingParams) -> Any:
        """The compiled grammar of ``params``' constraint (cached); RequestError if it is invalid."""
        kind, text = params.constraint
        return self.compiler.compile(kind, text)

    def start(self, compiled: Any, params: SamplingParams) -> Guide:
        """A new sample's matcher."""
        self.live += 1
        return Guide(self._matcher_cls(compiled), self._usable[params.json_schema is not None])

    def release(self, guide: Guide) -> None:
        self.live -= 1

    def fill(self, guides: list[Guide | None], masks: torch.Tensor) -> None:
        """Row ``i`` of ``masks`` (int32 bitmask words, CPU) gets the tokens ``guides[i]`` allows next; a
        row whose sample has finished (None: its token is discarded) allows every token."""
        start = time.perf_counter()
        words = masks.numpy()
        active = [i for i, g in enumerate(guides) if g is not None]
        words[[i for i, g in enumerate(guides) if g is None]] = -1
        if active:
            self._batch.batch_fill_next_token_bitmask([guides[i].matcher for i in active], masks, active)
            for usable in self._usable.values():
                rows = [i for i in active if guides[i].usable is usable]
                if rows:
                    words[rows] &= usable
        self.fill_s += time.perf_counter() - start
        self.rows_filled += len(guides)

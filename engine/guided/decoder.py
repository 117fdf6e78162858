"""The loop's side of constrained decoding: one grammar matcher per constrained sample, advanced with each of
its tokens, and the token masks of a step's constrained rows, filled on the CPU.

Per step, the work is two calls into the library, whatever the number of rows: ``accept`` advances
the matchers of a step's constrained rows with their tokens, ``fill`` (or ``start_fill``, on a
background thread, since the library releases the GIL while it fills) writes the masks of the
next step's constrained rows. The tokens a constraint may not use are folded into its compiled
grammar (``GrammarCompiler``), so a mask needs nothing after the library's fill.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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


class GuidedDecoder:
    """Compiles constraints (cached), starts a matcher per sample, advances them and fills the masks of a step's rows.

    Built on the first constrained request; ``fill_s`` and ``rows_filled`` add up the mask work
    (``fill_s``: the library's time, on whichever thread ran it), ``accept_s`` the matchers' advance.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, sorted(stop_ids))
        xgr = self.compiler.xgr
        self._matcher_cls = xgr.GrammarMatcher
        self._batch = xgr.BatchGrammarMatcher(max_threads=fill_threads())
        self._batch_accept = xgr.BatchGrammarMatcher.batch_accept_token
        self._stop_ids = stop_ids
        self._pool: ThreadPoolExecutor | None = None
        self.live = 0
        """Samples with a matcher that have not finished: while 0, the loop skips constrained decoding."""
        self.fill_s = 0.0
        self.rows_filled = 0
        self.accept_s = 0.0

    def compile(self, params: SamplingParams) -> Any:
        """The compiled grammar of ``params``' constraint (cached); RequestError if it is invalid."""
        kind, text = params.constraint
        return self.compiler.compile(kind, text)

    def start(self, compiled: Any, params: SamplingParams) -> Guide:
        """A new sample's matcher."""
        self.live += 1
        return Guide(self._matcher_cls(compiled))

    def release(self, guide: Guide) -> None:
        self.live -= 1

    def accept(self, guides: list[Guide], tokens: list[int]) -> tuple[list[bool], list[bool]]:
        """Advance each of ``guides`` past its token (one call for all): whether each was allowed, and
        whether each was a stop token that the grammar accepted (its matcher has terminated)."""
        if not guides:
            return [], []
        start = time.perf_counter()
        ok = self._batch_accept([g.matcher for g in guides], tokens)
        stop = self._stop_ids
        terminated = [a and t in stop for a, t in zip(ok, tokens, strict=True)]
        self.accept_s += time.perf_counter() - start
        return ok, terminated

    def fill(self, guides: list[Guide], masks: torch.Tensor, skip: list[bool] | None = None) -> None:
        """Row ``i`` of ``masks`` (int32 bitmask words, CPU) gets the tokens ``guides[i]`` allows next; a row
        marked in ``skip`` (its sample is over: its token will be discarded) allows every token."""
        start = time.perf_counter()
        if skip is None or not any(skip):
            self._batch.batch_fill_next_token_bitmask([g.matcher for g in guides], masks)
        else:
            rows = [i for i, s in enumerate(skip) if not s]
            masks[[i for i, s in enumerate(skip) if s]] = -1
            if rows:
                self._batch.batch_fill_next_token_bitmask([guides[i].matcher for i in rows], masks, rows)
        self.fill_s += time.perf_counter() - start
        self.rows_filled += len(guides)

    def start_fill(self, guides: list[Guide], masks: torch.Tensor, skip: list[bool] | None = None) -> Future:
        """``fill`` on a background thread (the library releases the GIL): the loop goes on meanwhile, and
        waits on the returned future before the masks are copied. The matchers must not advance until then."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="guided-fill")
        return self._pool.submit(self.fill, guides, masks, skip)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

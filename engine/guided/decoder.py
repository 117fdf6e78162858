"""The loop's side of constrained decoding: one grammar matcher per constrained sample, advanced with each of
its tokens, and the token masks of a step's constrained rows, filled on the CPU.

Per step, the work is two calls into the library, whatever the number of rows: ``advance`` moves
the matchers of a step's constrained rows past their tokens, ``fill`` writes the masks of the next
step's constrained rows. The async loop runs both on the decoder's thread (``submit``; the library
releases the GIL), while the loop processes outputs and prepares the next step. The tokens a constraint may not use are folded into its compiled
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
    terminated: bool = False
    """It accepted a stop token: the constraint is complete and the sample ends (no mask to fill)."""
    broken: bool = False
    """The library refused a token that its own mask allowed (not expected): the sample fails at its next token."""


class GuidedDecoder:
    """Compiles constraints (cached), starts a matcher per sample, advances them and fills the masks of a step's rows.

    Built on the first constrained request; ``fill_s`` and ``rows_filled`` add up the mask work
    (``fill_s``: the library's time, on whichever thread ran it), ``accept_s`` the matchers' advance.
    The matchers are used by one thread at a time: the loop's, or the decoder's during a job.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, sorted(stop_ids))
        xgr = self.compiler.xgr
        self._matcher_cls = xgr.GrammarMatcher
        self._batch = xgr.BatchGrammarMatcher(max_threads=fill_threads())
        self._batch_accept = xgr.BatchGrammarMatcher.batch_accept_token
        self._stop_ids = stop_ids
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future | None = None
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

    def advance(self, guides: list[Guide], tokens: list[int]) -> None:
        """Advance each of ``guides`` past its token, in one call into the library. The tokens were drawn
        under the guides' masks, so the library accepts them; one it refuses marks its guide ``broken``."""
        if not guides:
            return
        start = time.perf_counter()
        ok = self._batch_accept([g.matcher for g in guides], tokens)
        stop = self._stop_ids
        for guide, accepted, token in zip(guides, ok, tokens, strict=True):
            if not accepted:
                guide.broken = True
            elif token in stop:
                guide.terminated = True
        self.accept_s += time.perf_counter() - start

    def fill(self, guides: list[Guide], masks: torch.Tensor) -> None:
        """Row ``i`` of ``masks`` (int32 bitmask words, CPU) gets the tokens ``guides[i]`` allows next; a row
        whose matcher has terminated (its sample is over: the token is discarded) allows every token."""
        start = time.perf_counter()
        live = [i for i, g in enumerate(guides) if not g.terminated]
        if len(live) == len(guides):
            self._batch.batch_fill_next_token_bitmask([g.matcher for g in guides], masks)
        else:
            masks[[i for i, g in enumerate(guides) if g.terminated]] = -1
            if live:
                self._batch.batch_fill_next_token_bitmask([guides[i].matcher for i in live], masks, live)
        self.fill_s += time.perf_counter() - start
        self.rows_filled += len(guides)

    def _advance_and_fill(self, guides, tokens, fill_guides, masks) -> None:
        self.advance(guides, tokens)
        if fill_guides:
            self.fill(fill_guides, masks)

    def submit(
        self,
        guides: list[Guide],
        tokens: list[int],
        fill_guides: list[Guide] | None = None,
        masks: torch.Tensor | None = None,
    ) -> Future:
        """On the decoder's thread (the library releases the GIL, so the loop goes on meanwhile): ``advance``
        ``guides`` with ``tokens``, then ``fill`` the masks of ``fill_guides``. Jobs run in order; the
        matchers must not be used elsewhere until the job is done (``wait``)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="guided")
        self._last = self._pool.submit(self._advance_and_fill, guides, tokens, fill_guides, masks)
        return self._last

    def wait(self) -> None:
        """Until every submitted job is done."""
        if self._last is not None:
            self._last.result()
            self._last = None

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

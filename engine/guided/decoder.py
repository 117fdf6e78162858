"""The loop's side of constrained decoding: one grammar matcher per constrained sample, advanced with each of
its tokens, and the token masks of a step's constrained rows, filled on the CPU.

Per step, the work is two calls into the library, whatever the number of rows: ``advance`` moves
the matchers of a step's constrained rows past their tokens, ``fill`` writes the masks of the next
step's constrained rows. The async loop runs the fill on the decoder's thread (``start_fill``; the
library releases the GIL) while it processes outputs and prepares the next step. The tokens a constraint may not use are folded into its compiled
grammar (``GrammarCompiler``), so a mask needs nothing after the library's fill.
"""

from __future__ import annotations

import os
import threading
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
        self._pool_pid = 0
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

    def advance(self, guides: list[Guide], tokens: list[int]) -> list[bool]:
        """Advance each of ``guides`` past its token, in one call into the library; whether each token was
        allowed (a refused one leaves its matcher as it was)."""
        if not guides:
            return []
        start = time.perf_counter()
        ok = self._batch_accept([g.matcher for g in guides], tokens)
        stop = self._stop_ids
        for guide, accepted, token in zip(guides, ok, tokens, strict=True):
            if accepted and token in stop:
                guide.terminated = True
        self.accept_s += time.perf_counter() - start
        return ok

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

    def start_fill(self, guides: list[Guide], masks: torch.Tensor) -> Future:
        """``fill`` on the decoder's thread; the loop goes on meanwhile and waits on the returned future
        before the masks are copied. The matchers must not advance until then.

        The library releases the GIL while it fills, but a thread waiting for the GIL gets it only when
        the holder blocks or after the switch interval (5 ms): more than the loop's Python work until
        it waits for the masks. So this returns once the decoder's thread holds the GIL and is about to
        enter the library."""
        if self._pool is None or self._pool_pid != os.getpid():  # a forked child has no thread of its own
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="guided-fill")
            self._pool_pid = os.getpid()
        started = threading.Event()
        self._last = self._pool.submit(self._fill_job, started, guides, masks)
        started.wait()
        return self._last

    def _fill_job(self, started: threading.Event, guides: list[Guide], masks: torch.Tensor) -> None:
        started.set()
        self.fill(guides, masks)

    def wait(self) -> None:
        """Until the last fill started is done."""
        if self._last is not None:
            self._last.result()
            self._last = None

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

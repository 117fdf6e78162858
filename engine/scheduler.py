"""Continuous-batching scheduler: decodes first, then chunked prefills, under a token budget."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from engine.block_manager import BlockManager
from engine.sequence import SeqStatus, Sequence


@dataclass(slots=True)
class ScheduledSeq:
    """``num_new_tokens`` tokens of ``seq`` starting at position ``start``; ``sample``: emits a token;
    ``num_scored``: its first tokens whose logits score the next prompt token (``prompt_logprobs``)."""

    seq: Sequence
    start: int
    num_new_tokens: int
    sample: bool
    num_scored: int = 0


@dataclass
class ScheduledBatch:
    """What one step computes, in input order."""

    items: list[ScheduledSeq] = field(default_factory=list)
    sampled: list[ScheduledSeq] = field(default_factory=list)
    """The items that emit a token, in input order: one row each of the step's sampled outputs."""
    preempted: list[Sequence] = field(default_factory=list)
    num_tokens: int = 0
    num_scored: int = 0
    """Prompt positions scored by this step (``prompt_logprobs``), over all items."""
    decode_tokens: int = 0
    """Tokens that decode (one new token after the prompt); the rest are prefill (or recompute)."""
    block_tables: np.ndarray | None = None
    """The items' block tables when scheduled, one row each, padded with the null block."""

    @property
    def prefill_tokens(self) -> int:
        return self.num_tokens - self.decode_tokens

    def __bool__(self) -> bool:
        return bool(self.items)

    def store_scores(
        self, logprobs: list[float], top_ids: list[list[int]], top_lps: list[list[float]]
    ) -> None:
        """Put the step's prompt scores into its sequences (by position: a recomputed chunk writes the same entries)."""
        row = 0
        for it in self.items:
            p = it.num_scored
            if not p:
                continue
            seq = it.seq
            seq.prompt_logprobs[it.start : it.start + p] = logprobs[row : row + p]
            k = seq.params.prompt_logprobs
            if k:
                for j in range(p):
                    seq.prompt_top[it.start + j] = dict(
                        zip(top_ids[row + j][:k], top_lps[row + j][:k], strict=True)
                    )
            row += p


class Scheduler:
    """Chooses each step's sequences and token counts, and preempts when the cache runs out.

    Running sequences go first, oldest first (a decode needs one token, an unfinished prefill
    its next chunk); then waiting sequences are admitted in arrival order while the token budget,
    the sequence cap and free blocks allow. When a running sequence cannot get a block, the
    most recently admitted running sequence is preempted: its blocks are freed and it is
    recomputed later from its prompt and the tokens it had generated.
    """

    def __init__(self, block_manager: BlockManager, max_batch_tokens: int, max_num_seqs: int):
        self.blocks = block_manager
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admissions = 0
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_batch_tokens
        kept: list[Sequence] = []
        queue = deque(self.running)
        bs = self.blocks.block_size
        items, sampled = batch.items, batch.sampled
        num_tokens = decode_tokens = 0
        while queue and budget > 0:
            seq = queue.popleft()
            start = seq.num_computed_tokens
            total = seq.prompt_len + len(seq.output_token_ids) + seq.num_pending_tokens
            want = total - start
            if want > budget:
                want = budget
            params = seq.params
            if want <= 0 or (params.max_new_tokens == 0 and start >= seq.prompt_len):
                # Every token is in flight already (the async loop runs one step ahead), or a
                # scoring-only sequence finishes when its prefill's outputs are processed.
                kept.append(seq)
                continue
            if start + want > len(seq.block_table) * bs:  # it needs blocks: take them, or preempt
                n = self._fit(seq, want, preempt_from=queue, batch=batch)
                if n == 0:
                    self._preempt(seq, batch)
                    continue
                self._schedule(seq, n, batch)
                kept.append(seq)
                budget -= n
                continue
            # The common case, inlined (``_schedule`` without growing the table).
            end = start + want
            seq.num_computed_tokens = end
            if end // bs > seq.num_hashed_blocks:
                self.blocks.register_full_blocks(seq)
            scored = 0
            if params.prompt_logprobs is not None:
                scored = max(0, min(end, seq.prompt_len - 1) - start)
                batch.num_scored += scored
            item = ScheduledSeq(seq, start, want, end == total, scored)
            items.append(item)
            if end == total:
                seq.num_pending_tokens += 1
                sampled.append(item)
            num_tokens += want
            if want == 1 and start >= seq.prompt_len:
                decode_tokens += 1
            kept.append(seq)
            budget -= want
        kept.extend(queue)
        self.running = kept
        batch.num_tokens += num_tokens
        batch.decode_tokens += decode_tokens

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted while its last token was in flight: recompute once that token is known
            if not seq.block_table:
                self.blocks.match_prefix(seq)
            want = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.blocks.can_grow(seq, seq.num_computed_tokens + want):
                if not batch.items and not self.running:
                    want = self._tokens_that_fit(seq, want)
                if want == 0 or not self.blocks.can_grow(seq, seq.num_computed_tokens + want):
                    self.blocks.free_seq(seq)
                    seq.num_computed_tokens = 0
                    break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.admitted_at = self._admissions
            self._admissions += 1
            self.running.append(seq)
            self._schedule(seq, want, batch)
            budget -= want
        if batch.items:
            batch.block_tables = self.blocks.tables([it.seq for it in batch.items])
        return batch

    def finish(self, seq: Sequence) -> None:
        """Remove a finished sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)

    def _fit(self, seq: Sequence, want: int, preempt_from: deque[Sequence], batch: ScheduledBatch) -> int:
        """Tokens of ``seq`` that can be scheduled, preempting the youngest others if needed."""
        while not self.blocks.can_grow(seq, seq.num_computed_tokens + want):
            n = self._tokens_that_fit(seq, want)
            if n > 0:
                return n
            if not preempt_from:
                return 0
            victim = max(preempt_from, key=lambda s: s.admitted_at)
            if victim.admitted_at < seq.admitted_at:
                return 0
            preempt_from.remove(victim)
            self._preempt(victim, batch)
        return want

    def _tokens_that_fit(self, seq: Sequence, want: int) -> int:
        capacity = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
        return max(0, min(want, capacity - seq.num_computed_tokens))

    def _schedule(self, seq: Sequence, n: int, batch: ScheduledBatch) -> None:
        start = seq.num_computed_tokens
        end = start + n
        if end > len(seq.block_table) * self.blocks.block_size:
            self.blocks.grow(seq, end)
        seq.num_computed_tokens = end
        if end // self.blocks.block_size > seq.num_hashed_blocks:
            self.blocks.register_full_blocks(seq)
        sample = end == seq.num_tokens
        scored = 0
        if seq.params.prompt_logprobs is not None:
            scored = max(0, min(end, seq.prompt_len - 1) - start)
            batch.num_scored += scored
        item = ScheduledSeq(seq, start, n, sample, scored)
        batch.items.append(item)
        if sample:
            seq.num_pending_tokens += 1
            batch.sampled.append(item)
        batch.num_tokens += n
        if n == 1 and start >= seq.prompt_len:
            batch.decode_tokens += 1

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.blocks.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

"""A step's constrained rows as the loop carries them: which rows, their samples and matchers, the host
buffer their masks are filled into and the decoder's job filling it (``engine.guided`` explains the
overlap)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from engine.runner.sampler import INVALID_TOKEN
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


@dataclass(slots=True)
class GuidedRows:
    """A step's sampling rows with a constraint, their samples and their matchers (as the step was built)."""

    rows: list[int]
    seqs: list[Sequence]
    guides: list[Any]
    masks: torch.Tensor | None = None
    """The host buffer their masks are filled into (``ModelRunner.token_masks``)."""
    filling: Future | None = None
    """The decoder's job that fills them (async loop), until the step's sampling is launched."""

    @classmethod
    def of(cls, batch: ScheduledBatch) -> GuidedRows | None:
        """The constrained rows of ``batch``, or None if it has none."""
        rows, seqs, guides = [], [], []
        for row, it in enumerate(batch.sampled):
            guide = it.seq.guide
            if guide is not None:
                rows.append(row)
                seqs.append(it.seq)
                guides.append(guide)
        return cls(rows, seqs, guides) if rows else None

    def wait_for_masks(self) -> None:
        """Wait for the decoder's fill; a sample that finished meanwhile (its token is discarded) allows every token."""
        if self.filling is None:
            return
        self.filling.result()
        self.filling = None
        for i, seq in enumerate(self.seqs):
            if seq.guide is None:
                self.masks[i] = -1

    def kept_tokens(self, tokens: list[int]) -> tuple[list[int], list[Any], list[int]]:
        """The rows whose sampled token the loop keeps, their matchers and those tokens: as the loop's
        output processing, a finished sample, a discarded or unused token, an invalid token do not count."""
        rows, guides, kept = [], [], []
        for row, seq, guide in zip(self.rows, self.seqs, self.guides, strict=True):
            if seq.is_finished or seq.discard_pending or seq.params.max_new_tokens == 0:
                continue
            token = tokens[row]
            if token == INVALID_TOKEN:
                continue
            rows.append(row)
            guides.append(guide)
            kept.append(token)
        return rows, guides, kept

"""One sample of one request as it moves through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams
from engine.top_logprobs import TopLogprobs


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Token state of one sample: the prompt, the tokens generated so far and the KV already computed.

    ``num_computed_tokens`` counts tokens whose KV is in the cache, including those of a step
    that is scheduled but not finished yet: the scheduler advances it when it schedules a step.
    ``num_pending_tokens`` counts sampled tokens not yet known on the host (the async loop).
    ``discard_pending`` counts in-flight samples to drop when they arrive: after a forced
    end-of-thinking marker (``SamplingParams.max_think_tokens``), the token the async loop was
    already sampling after the last known one no longer follows the sequence.
    """

    seq_id: int
    request_id: str
    sample_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    discard_pending: int = 0
    think_closed: bool = False
    guide: Any = None
    """The constraint's matcher (``engine.guided.decoder.Guide``) of a constrained sample, until it finishes."""
    block_table: list[int] = field(default_factory=list)
    table_row: int = -1
    """This sequence's row in its block manager's array of block tables (-1: it holds no block)."""
    num_hashed_blocks: int = 0
    last_block_hash: bytes | None = None
    status: SeqStatus = SeqStatus.WAITING
    admitted_at: int = -1
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    detok_prefix_offset: int = 0
    detok_read_offset: int = 0
    prompt_logprobs: list[float] | None = None
    """With ``params.prompt_logprobs``: entry ``p`` is the logprob of prompt token ``p + 1``."""
    prompt_top: list[dict[int, float]] | None = None
    """With ``params.prompt_logprobs`` = k > 0: the top k (token id -> logprob) at each position."""
    top: TopLogprobs | None = None
    """With ``params.top_logprobs`` = k > 0: the top k alternatives of each output token."""
    prompt_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = len(self.prompt_token_ids)
        k = self.params.prompt_logprobs
        if k is not None:
            self.prompt_logprobs = [0.0] * (self.prompt_len - 1)
            if k > 0:
                self.prompt_top = [{} for _ in range(self.prompt_len - 1)]
        if self.params.top_logprobs:
            self.top = TopLogprobs(self.params.top_logprobs, self.params.max_new_tokens)

    @property
    def num_tokens(self) -> int:
        """All tokens of the sequence, those still being sampled included."""
        return self.prompt_len + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        return self.prompt_len + len(self.output_token_ids)

    def known_tokens(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + known output."""
        p = self.prompt_len
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

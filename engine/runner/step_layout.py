"""One step's inputs: the host-side arrays (``StepArrays``) and their packed layout, declared once.

The I/O slots (``io_slots``), the tensor-parallel step channel (``engine.parallel.channel``) and
the model runner all place the arrays by this layout: integer fields back to back in one int64
buffer (block tables after the per-step fields, so a step copies only the rows it uses, then the
prompt-scoring fields, copied only by a step that scores), float fields in one float32 buffer.

Top logprobs of generated tokens need no input array: a flag (``any_top_logprobs``) says whether the
step computes them, for every sampling row at the engine's fixed width.

Prompt scoring (``SamplingParams.prompt_logprobs``): a step lists the token positions whose logits
it keeps besides the sampling rows (``score_indices``, into the step's tokens) and the token each
of them is scored against (``score_targets``: the next prompt token).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from engine.sampling_params import MAX_PROMPT_LOGPROBS  # noqa: F401 (re-exported: the scoring buffers' width)

MAX_SUPPRESS = 16
"""Most token ids one request can forbid before min_new_tokens (its EOS and stop ids)."""


@dataclass(frozen=True)
class Field:
    """A packed field: ``per`` says what it has one entry (or ``width`` entries) per."""

    name: str
    per: str  # "token", "seq", "row" (a sampling row) or "score" (a scored prompt position)
    width: int | str = 1  # entries per token/seq/row; "blocks" = the block-table width


INT_FIELDS = (
    Field("input_ids", "token"),
    Field("carry", "token"),
    Field("positions", "token"),
    Field("slot_mapping", "token"),
    Field("query_seq", "token"),
    Field("query_index", "token"),
    Field("context_lens", "seq"),
    Field("logits_indices", "row"),
    Field("top_k", "row"),
    Field("seed", "row"),
    Field("sample_pos", "row"),
    Field("suppress", "row", MAX_SUPPRESS),
    Field("block_tables", "seq", "blocks"),
    Field("score_indices", "score"),
    Field("score_targets", "score"),
)
"""The int64 buffer's fields, in order (block tables, then the scoring fields, last)."""
SCORE_FIELDS = ("score_indices", "score_targets")
"""The fields after the block tables: only a step that scores copies them."""
FLOAT_FIELDS = (Field("temperature", "row"), Field("top_p", "row"), Field("min_p", "row"))
"""The float32 buffer's fields, in order."""
FLAGS = (
    "max_query_len",
    "max_context_len",
    "any_sampling",
    "any_top_k_top_p",
    "any_min_p",
    "score_top_k",
    "any_top_logprobs",
)
"""Scalars of a step (not in the buffers)."""


def field_lengths(
    fields: tuple[Field, ...], tokens: int, seqs: int, rows: int, blocks: int, scores: int = 0
) -> Iterator[tuple[Field, int]]:
    """Each field with its number of entries for the given sizes."""
    count = {"token": tokens, "seq": seqs, "row": rows, "score": scores}
    for f in fields:
        yield f, count[f.per] * (blocks if f.width == "blocks" else int(f.width))


def offsets(
    fields: tuple[Field, ...], tokens: int, seqs: int, rows: int, blocks: int, scores: int = 0
) -> dict[str, int]:
    """Each field's start in a buffer sized for up to these counts; ``"end"`` is the total."""
    out, pos = {}, 0
    for f, n in field_lengths(fields, tokens, seqs, rows, blocks, scores):
        out[f.name], pos = pos, pos + n
    out["end"] = pos
    return out


@dataclass
class StepArrays:
    """Host-side inputs of one step. Token arrays have ``num_tokens`` entries, sequence arrays
    ``num_seqs``, sampling arrays ``num_sampled`` (the sequences that emit a token, in order),
    scoring arrays ``num_scored`` (the prompt positions scored, in order; empty in most steps).
    ``score_top_k`` is the most top alternatives a scored position of this step asks for;
    ``any_top_logprobs``: some sampling row asks for its token's top alternatives
    (``SamplingParams.top_logprobs``), so the step computes them for every row."""

    input_ids: np.ndarray
    carry: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_seq: np.ndarray
    query_index: np.ndarray
    block_tables: np.ndarray
    context_lens: np.ndarray
    logits_indices: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    seed: np.ndarray
    sample_pos: np.ndarray
    suppress: np.ndarray
    max_query_len: int
    max_context_len: int
    any_sampling: bool
    any_top_k_top_p: bool
    any_min_p: bool
    score_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    score_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    score_top_k: int = 0
    any_top_logprobs: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_sampled(self) -> int:
        return len(self.logits_indices)

    @property
    def num_scored(self) -> int:
        return len(self.score_indices)

    @property
    def sizes(self) -> tuple[int, int, int, int, int]:
        """(tokens, sequences, sampling rows, block-table width, scored positions): ``field_lengths``' order."""
        return self.num_tokens, self.num_seqs, self.num_sampled, self.block_tables.shape[1], self.num_scored

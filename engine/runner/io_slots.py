"""One I/O slot: pinned host buffers and device buffers for a step's inputs and sampled outputs.

The engine alternates two slots, so preparing step N+1 never touches buffers that step N's
transfer or compute still reads. All integer inputs live in one buffer and all float inputs
in another (one host-to-device copy each); the block tables come after the per-step fields, so a
step copies only the rows it uses, and the prompt-scoring fields after them are copied only by a
step that scores. Buffer addresses never change, which is what CUDA graphs need.

The top-logprobs outputs are ``[max_seqs, top_width]`` (ids int32, logprobs float32): a step whose
rows ask for them writes every row at the full width and copies its rows back; a row that did not
ask reads nothing of them.

Token masks (constrained decoding) have their own buffers, allocated by the first step that has
constrained rows and copied apart from the step's other inputs: they are filled after the step's
forward pass is enqueued (``engine.guided`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.model.attention import AttentionMetadata
from engine.runner.sampler import SamplingTensors, TokenMask
from engine.runner.step_layout import (
    FLOAT_FIELDS,
    INT_FIELDS,
    MAX_PROMPT_LOGPROBS,
    MAX_SUPPRESS,
    SCORE_FIELDS,
    StepArrays,
    offsets,
)

_TOKEN_FIELDS = [f.name for f in INT_FIELDS if f.per == "token"]
_ROW_FIELDS = [f.name for f in INT_FIELDS if f.per == "row" and f.width == 1]


@dataclass
class DeviceStep:
    """Device views of a slot for one step's (padded) sizes."""

    input_ids: torch.Tensor
    carry: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampling: SamplingTensors
    tokens_out: torch.Tensor
    logprobs_out: torch.Tensor
    score: ScoreStep | None = None
    """The step's scored prompt positions; None when it scores none (every graph step)."""
    top_ids_out: torch.Tensor | None = None
    """int32 [rows, top_width]: each row's most likely token ids; None when no row of the step asks."""
    top_logprobs_out: torch.Tensor | None = None
    """float32 [rows, top_width]: their logprobs under the raw logits."""


@dataclass
class ScoreStep:
    """Device views for the prompt positions a step scores: inputs and outputs."""

    indices: torch.Tensor  # int64 [P]: rows of the step's tokens whose logits are kept
    targets: torch.Tensor  # int64 [P]: the token each is scored against
    top_k: int  # alternatives per position (the step's largest ask)
    logprobs_out: torch.Tensor  # float32 [P]
    top_ids_out: torch.Tensor  # int64 [P, top_k]
    top_logprobs_out: torch.Tensor  # float32 [P, top_k]


@dataclass
class _MaskBuffers:
    """Token masks of up to one step's sampling rows: the masked rows and their bitmask words."""

    host_rows: torch.Tensor
    host_words: torch.Tensor
    dev_rows: torch.Tensor
    dev_words: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, words: int, device: torch.device, pin: bool) -> _MaskBuffers:
        host_rows = torch.zeros(rows, dtype=torch.int64, pin_memory=pin)
        host_words = torch.zeros((rows, words), dtype=torch.int32, pin_memory=pin)
        return cls(host_rows, host_words, host_rows.to(device, copy=True), host_words.to(device, copy=True))


class IOSlot:
    """Buffers for steps of up to ``max_tokens`` tokens and ``max_seqs`` sequences; ``top_width`` top
    alternatives per sampling row."""

    def __init__(
        self,
        max_tokens: int,
        max_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
        pipeline,
        top_width: int = 0,
    ):
        self.max_tokens, self.max_seqs, self.width = max_tokens, max_seqs, max_blocks_per_seq
        self.top_width = top_width
        self.offsets = offsets(INT_FIELDS, max_tokens, max_seqs, max_seqs, max_blocks_per_seq, max_tokens)
        self.float_offsets = offsets(FLOAT_FIELDS, max_tokens, max_seqs, max_seqs, max_blocks_per_seq)
        total = self.offsets["end"]
        pin = device.type == "cuda"
        self.host_int = torch.zeros(total, dtype=torch.int64, pin_memory=pin)
        self.host_float = torch.zeros(self.float_offsets["end"], dtype=torch.float32, pin_memory=pin)
        self.dev_int = torch.zeros(total, dtype=torch.int64, device=device)
        self.dev_float = torch.zeros_like(self.host_float, device=device)
        self.dev_tokens = torch.zeros(max_seqs, dtype=torch.int64, device=device)
        self.dev_logprobs = torch.zeros(max_seqs, dtype=torch.float32, device=device)
        self.host_tokens = torch.zeros(max_seqs, dtype=torch.int64, pin_memory=pin)
        self.host_logprobs = torch.zeros(max_seqs, dtype=torch.float32, pin_memory=pin)
        # Prompt scoring outputs: at most one scored position per token of a step.
        top = max_tokens * MAX_PROMPT_LOGPROBS
        self.dev_score_logprobs = torch.zeros(max_tokens, dtype=torch.float32, device=device)
        self.dev_score_top_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.dev_score_top_logprobs = torch.zeros(top, dtype=torch.float32, device=device)
        self.host_score_logprobs = torch.zeros(max_tokens, dtype=torch.float32, pin_memory=pin)
        self.host_score_top_ids = torch.zeros(top, dtype=torch.int64, pin_memory=pin)
        self.host_score_top_logprobs = torch.zeros(top, dtype=torch.float32, pin_memory=pin)
        top = (max_seqs, top_width)
        self.dev_top_ids = torch.zeros(top, dtype=torch.int32, device=device)
        self.dev_top_logprobs = torch.zeros(top, dtype=torch.float32, device=device)
        self.host_top_ids = torch.zeros(top, dtype=torch.int32, pin_memory=pin)
        self.host_top_logprobs = torch.zeros(top, dtype=torch.float32, pin_memory=pin)
        self._int_np, self._float_np = self.host_int.numpy(), self.host_float.numpy()
        self.h2d_done = pipeline.event()
        self.compute_start = pipeline.event(timing=True)
        self.compute_done = pipeline.event(timing=True)
        self.d2h_done = pipeline.event()
        self._copy_len = 0
        self._score_copy = (0, 0)
        self.device, self.pin = device, pin
        self.masks_copied = pipeline.event()  # the host mask buffers may be written again
        self.masks_read = pipeline.event()  # the device mask buffers may be written again
        self._masks: _MaskBuffers | None = None
        self._num_masked = 0
        self._logits: torch.Tensor | None = None

    def keep_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` copied into this slot's logits buffer (allocated on first use, ``max_seqs`` rows): the
        fixed output of its forward-only graphs, shared by all of them instead of one tensor each."""
        rows, vocab = logits.shape
        if self._logits is None or self._logits.shape[1] != vocab or self._logits.dtype != logits.dtype:
            self._logits = torch.empty((self.max_seqs, vocab), dtype=logits.dtype, device=logits.device)
        out = self._logits[:rows]
        out.copy_(logits)
        return out

    def host_masks(self, rows: list[int], words: int) -> torch.Tensor:
        """The host buffer to fill with the token masks of sampling ``rows`` (``words`` int32 words a row)."""
        if self._masks is None or self._masks.host_words.shape[1] != words:
            self._masks = _MaskBuffers.allocate(self.max_seqs, words, self.device, self.pin)
        self.masks_copied.synchronize()
        n = self._num_masked = len(rows)
        self._masks.host_rows[:n] = torch.as_tensor(rows, dtype=torch.int64)
        return self._masks.host_words[:n]

    def copy_masks_to_device(self) -> None:
        m, n = self._masks, self._num_masked
        m.dev_words[:n].copy_(m.host_words[:n], non_blocking=True)
        m.dev_rows[:n].copy_(m.host_rows[:n], non_blocking=True)

    def token_mask(self) -> TokenMask:
        """Device views of the masks copied by ``copy_masks_to_device``."""
        m, n = self._masks, self._num_masked
        return TokenMask(m.dev_rows[:n], m.dev_words[:n])

    def load(self, a: StepArrays, num_tokens: int, num_seqs: int, num_rows: int) -> None:
        """Write ``a`` into the host buffers, padded to ``num_tokens`` tokens, ``num_seqs`` sequences
        and ``num_rows`` sampling rows.

        Padding tokens write their KV to the null block's slot 0 and carry nothing; padding
        sequences see one cached token and sample greedily; their outputs are never read.
        """
        ints, floats, off = self._int_np, self._float_np, self.offsets
        t, s = a.num_tokens, a.num_seqs
        for name in _TOKEN_FIELDS:
            view = ints[off[name] : off[name] + num_tokens]
            view[:t] = getattr(a, name)
            view[t:] = -1 if name == "carry" else 0
        if num_tokens > t:  # each padding token is its own padding sequence when there are enough
            pad = np.arange(num_tokens - t)
            ints[off["query_seq"] + t : off["query_seq"] + num_tokens] = np.minimum(s + pad, num_seqs - 1)
        lens = ints[off["context_lens"] : off["context_lens"] + num_seqs]
        lens[:s], lens[s:] = a.context_lens, 1
        for name in _ROW_FIELDS:
            view = ints[off[name] : off[name] + num_rows]
            view[: a.num_sampled], view[a.num_sampled :] = getattr(a, name), 0
        if num_rows > a.num_sampled:
            li = ints[off["logits_indices"] : off["logits_indices"] + num_rows]
            li[a.num_sampled :] = np.minimum(np.arange(a.num_sampled, num_rows), num_tokens - 1)
        sup = ints[off["suppress"] : off["suppress"] + num_rows * MAX_SUPPRESS].reshape(
            num_rows, MAX_SUPPRESS
        )
        sup[:] = -1
        sup[: a.num_sampled] = a.suppress
        tables = ints[off["block_tables"] : off["block_tables"] + num_seqs * self.width].reshape(
            num_seqs, self.width
        )
        tables[:s, : a.block_tables.shape[1]] = a.block_tables
        tables[s:, 0] = 0
        for f in FLOAT_FIELDS:
            view = floats[self.float_offsets[f.name] : self.float_offsets[f.name] + num_rows]
            view[: a.num_sampled], view[a.num_sampled :] = (
                getattr(a, f.name),
                1.0 if f.name == "top_p" else 0.0,
            )
        self._copy_len = off["block_tables"] + num_seqs * self.width
        p = a.num_scored
        for name in SCORE_FIELDS:
            ints[off[name] : off[name] + p] = getattr(a, name)
        first = off[SCORE_FIELDS[0]]
        self._score_copy = (first, off[SCORE_FIELDS[-1]] + p) if p else (first, first)

    def copy_to_device(self) -> None:
        n = self._copy_len
        self.dev_int[:n].copy_(self.host_int[:n], non_blocking=True)
        self.dev_float.copy_(self.host_float, non_blocking=True)
        lo, hi = self._score_copy
        if hi > lo:
            self.dev_int[lo:hi].copy_(self.host_int[lo:hi], non_blocking=True)

    def copy_to_host(
        self, num_sampled: int, num_scored: int = 0, score_top_k: int = 0, top: bool = False
    ) -> None:
        self.host_tokens[:num_sampled].copy_(self.dev_tokens[:num_sampled], non_blocking=True)
        self.host_logprobs[:num_sampled].copy_(self.dev_logprobs[:num_sampled], non_blocking=True)
        if top:  # the first rows of a contiguous [max_seqs, width] buffer: one copy each
            self.host_top_ids[:num_sampled].copy_(self.dev_top_ids[:num_sampled], non_blocking=True)
            self.host_top_logprobs[:num_sampled].copy_(self.dev_top_logprobs[:num_sampled], non_blocking=True)
        if num_scored:
            self.host_score_logprobs[:num_scored].copy_(
                self.dev_score_logprobs[:num_scored], non_blocking=True
            )
            top = num_scored * score_top_k
            if top:
                self.host_score_top_ids[:top].copy_(self.dev_score_top_ids[:top], non_blocking=True)
                self.host_score_top_logprobs[:top].copy_(self.dev_score_top_logprobs[:top], non_blocking=True)

    def read_scores(
        self, num_scored: int, score_top_k: int
    ) -> tuple[list[float], list[list[int]], list[list[float]]]:
        """The host copies of a step's scores: logprob of each scored token, then the top ids and logprobs."""
        lps = self.host_score_logprobs[:num_scored].tolist()
        top = num_scored * score_top_k
        if not top:
            return lps, [], []
        ids = self.host_score_top_ids[:top].view(num_scored, score_top_k).tolist()
        top_lps = self.host_score_top_logprobs[:top].view(num_scored, score_top_k).tolist()
        return lps, ids, top_lps

    def read_top(self, num_sampled: int) -> tuple[np.ndarray, np.ndarray]:
        """The host copies of a step's top alternatives, ``[num_sampled, top_width]`` each: views of the
        slot's buffers, valid until the slot's next step copies back."""
        return self.host_top_ids[:num_sampled].numpy(), self.host_top_logprobs[:num_sampled].numpy()

    def view(self, name: str, n: int) -> torch.Tensor:
        """The first ``n`` entries of an integer field in the device buffer."""
        return self.dev_int[self.offsets[name] : self.offsets[name] + n]

    def device_step(
        self, num_tokens: int, num_seqs: int, num_rows: int, a: StepArrays, graph: bool
    ) -> DeviceStep:
        """Views of the device buffers sized for this step (fixed sizes when captured in a graph)."""
        v = self.view
        fo = self.float_offsets
        floats = [self.dev_float[fo[f.name] : fo[f.name] + num_rows] for f in FLOAT_FIELDS]
        width = self.width if graph else max(1, a.block_tables.shape[1])
        top = a.any_top_logprobs and self.top_width > 0
        tables = v("block_tables", num_seqs * self.width).view(num_seqs, self.width)[:, :width]
        metadata = AttentionMetadata(
            slot_mapping=v("slot_mapping", num_tokens),
            positions=v("positions", num_tokens),
            query_seq=v("query_seq", num_tokens),
            query_index=v("query_index", num_tokens),
            block_tables=tables,
            context_lens=v("context_lens", num_seqs),
            max_query_len=a.max_query_len,
            max_context_len=a.max_context_len,
        )
        sampling = SamplingTensors(
            temperature=floats[0],
            top_k=v("top_k", num_rows),
            top_p=floats[1],
            min_p=floats[2],
            seed=v("seed", num_rows),
            position=v("sample_pos", num_rows),
            suppress=v("suppress", num_rows * MAX_SUPPRESS).view(num_rows, MAX_SUPPRESS),
            any_sampling=a.any_sampling,
            any_top_k_top_p=a.any_top_k_top_p,
            any_min_p=a.any_min_p,
        )
        return DeviceStep(
            input_ids=v("input_ids", num_tokens),
            carry=v("carry", num_tokens),
            metadata=metadata,
            logits_indices=v("logits_indices", num_rows),
            sampling=sampling,
            tokens_out=self.dev_tokens[:num_rows],
            logprobs_out=self.dev_logprobs[:num_rows],
            score=None if graph or not a.num_scored else self._score_step(a.num_scored, a.score_top_k),
            top_ids_out=self.dev_top_ids[:num_rows] if top else None,
            top_logprobs_out=self.dev_top_logprobs[:num_rows] if top else None,
        )

    def _score_step(self, p: int, k: int) -> ScoreStep:
        return ScoreStep(
            indices=self.view("score_indices", p),
            targets=self.view("score_targets", p),
            top_k=k,
            logprobs_out=self.dev_score_logprobs[:p],
            top_ids_out=self.dev_score_top_ids[: p * k].view(p, k),
            top_logprobs_out=self.dev_score_top_logprobs[: p * k].view(p, k),
        )

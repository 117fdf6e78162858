"""Turn a scheduled batch into packed model inputs, run the forward pass and sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from .attention import AttentionMetadata, ForwardContext, set_forward_context
from .sampler import SamplingTensors, sample
from .scheduler import ScheduledBatch


@dataclass
class StepInputs:
    """Everything one forward + sample needs, as host tensors (moved to the device by ``to``)."""

    input_ids: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sampling: SamplingTensors
    want_logprobs: bool

    def to(self, device: torch.device, non_blocking: bool = False) -> StepInputs:
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        m, s = self.metadata, self.sampling
        return StepInputs(
            input_ids=mv(self.input_ids),
            metadata=AttentionMetadata(
                slot_mapping=mv(m.slot_mapping), positions=mv(m.positions), query_seq=mv(m.query_seq),
                query_index=mv(m.query_index), block_tables=mv(m.block_tables), context_lens=mv(m.context_lens),
                max_query_len=m.max_query_len, max_context_len=m.max_context_len,
            ),
            logits_indices=mv(self.logits_indices),
            sampling=SamplingTensors(
                temperature=mv(s.temperature), top_k=mv(s.top_k), top_p=mv(s.top_p), min_p=mv(s.min_p),
                seed=mv(s.seed), position=mv(s.position), suppress=mv(s.suppress),
                any_sampling=s.any_sampling, any_top_k_top_p=s.any_top_k_top_p, any_min_p=s.any_min_p,
            ),
            want_logprobs=self.want_logprobs,
        )


def _t(array: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


def prepare_inputs(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """Packed token ids, positions, cache slots and sampling rows of a scheduled batch.

    Work per step is a loop over sequences (to read their tokens and parameters); everything
    per token is built with array operations.
    """
    items = batch.items
    lens = np.fromiter((it.num_new_tokens for it in items), dtype=np.int64, count=len(items))
    starts = np.fromiter((it.start for it in items), dtype=np.int64, count=len(items))
    num_tokens = int(lens.sum())
    cu = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    query_seq = np.repeat(np.arange(len(items)), lens)
    query_index = np.arange(num_tokens) - np.repeat(cu[:-1], lens)
    positions = np.repeat(starts, lens) + query_index

    max_blocks = max(len(it.seq.block_table) for it in items)
    tables = np.zeros((len(items), max_blocks), dtype=np.int64)
    for i, it in enumerate(items):
        tables[i, : len(it.seq.block_table)] = it.seq.block_table
    slots = tables[query_seq, positions // block_size] * block_size + positions % block_size

    ids: list[int] = []
    for it in items:
        ids.extend(it.seq.known_tokens(it.start, it.start + it.num_new_tokens))

    sampled = [i for i, it in enumerate(items) if it.sample]
    rows = [items[i] for i in sampled]
    suppress_lists = [
        sorted(it.seq.stop_ids) if len(it.seq.output_token_ids) < it.seq.params.min_new_tokens else []
        for it in rows
    ]
    width = max((len(s) for s in suppress_lists), default=0)
    suppress = np.full((len(rows), width), -1, dtype=np.int64)
    for r, s in enumerate(suppress_lists):
        suppress[r, : len(s)] = s
    params = [it.seq.params for it in rows]
    sampling = SamplingTensors(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64),
        top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
        min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32),
        seed=torch.tensor([it.seq.seed for it in rows], dtype=torch.int64),
        position=torch.tensor([it.start + it.num_new_tokens for it in rows], dtype=torch.int64),
        suppress=_t(suppress),
        any_sampling=any(p.temperature > 0 for p in params),
        any_top_k_top_p=any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params),
        any_min_p=any(p.temperature > 0 and p.min_p > 0 for p in params),
    )
    metadata = AttentionMetadata(
        slot_mapping=_t(slots), positions=_t(positions), query_seq=_t(query_seq), query_index=_t(query_index),
        block_tables=_t(tables), context_lens=_t(starts + lens),
        max_query_len=int(lens.max()), max_context_len=int((starts + lens).max()),
    )
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        metadata=metadata,
        logits_indices=_t(cu[1:][sampled] - 1),
        sampling=sampling,
        want_logprobs=any(p.logprobs for p in params),
    )


class ModelRunner:
    """Runs one step on the device: forward over the packed tokens, then sampling."""

    def __init__(self, model: PreTrainedModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.model = model
        self.kv_caches = kv_caches

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled tokens and their logprobs (device tensors), one per sampling row."""
        set_forward_context(ForwardContext(inputs.metadata, self.kv_caches))
        try:
            out = self.model(
                input_ids=inputs.input_ids[None],
                position_ids=inputs.metadata.positions[None],
                logits_to_keep=inputs.logits_indices,
                use_cache=False,
            )
        finally:
            set_forward_context(None)
        return sample(out.logits[0], inputs.sampling, inputs.want_logprobs)

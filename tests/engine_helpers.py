"""Helpers shared by the engine tests: the exactness check against transformers and random attention steps."""

from __future__ import annotations

import torch

from engine import SamplingParams
from engine.model.attention import AttentionMetadata, write_kv
from tiny_models import hf_greedy, reference_model


def assert_matches_reference(llm, prompts, max_new):
    ref = reference_model(llm)
    params = [SamplingParams(temperature=0, max_new_tokens=m) for m in max_new]
    outputs = llm.generate(prompts, params)
    for prompt, m, out in zip(prompts, max_new, outputs, strict=True):
        assert out.error is None
        (sample,) = out.outputs
        assert sample.token_ids == hf_greedy(ref, prompt, m), f"prompt of {len(prompt)} tokens"
        assert sample.finish_reason == ("stop" if sample.token_ids[-1] == 2 else "length")


def random_step(context_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed):
    """A mixed prefill/decode step over sequences whose blocks are scattered through the cache."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 5
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 stays the null block
    tables = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int64)
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor([order.pop() for _ in range(n)])
    positions, query_seq, query_index = [], [], []
    for i, (c, q) in enumerate(zip(context_lens, query_lens, strict=True)):
        positions += list(range(c - q, c))
        query_seq += [i] * q
        query_index += list(range(q))
    positions = torch.tensor(positions)
    query_seq = torch.tensor(query_seq)
    slots = tables[query_seq, positions // block_size] * block_size + positions % block_size
    meta = AttentionMetadata(
        slots,
        positions,
        query_seq,
        torch.tensor(query_index),
        tables,
        torch.tensor(context_lens),
        max(query_lens),
        max(context_lens),
    )
    meta = AttentionMetadata(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in vars(meta).values()))
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to("cuda", dtype)
    v_cache = torch.randn(shape, generator=g).to("cuda", dtype)
    n = len(positions)
    q = torch.randn(n, heads, head_dim, generator=g).to("cuda", dtype)
    k = torch.randn(n, kv_heads, head_dim, generator=g).to("cuda", dtype)
    v = torch.randn(n, kv_heads, head_dim, generator=g).to("cuda", dtype)
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    return q, k_cache, v_cache, meta

"""The Triton paged-attention kernel agrees with the PyTorch reference path (CUDA only)."""

import pytest
import torch

from engine.attention import AttentionMetadata, reference_paged_attention, write_kv
from engine.kernels import kernels_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kernels_available(), reason="needs CUDA and Triton")]


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


CASES = [
    # context lens, query lens, heads, kv heads, head dim, block size
    ([1, 7, 300, 64], [1, 1, 1, 1], 32, 8, 128, 16),
    ([40, 129, 5], [40, 17, 1], 8, 2, 64, 16),
    ([33, 70], [33, 3], 4, 4, 64, 8),
    ([600, 2], [1, 2], 16, 1, 256, 32),
    ([1000, 517, 90, 1], [1, 1, 90, 1], 28, 4, 128, 16),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("window,softcap", [(None, None), (24, None), (None, 30.0)])
def test_triton_paged_attention_matches_reference(case, dtype, window, softcap):
    from engine.kernels import paged_attention

    q, kc, vc, meta = random_step(*case, dtype=dtype, seed=len(case[0]))
    scale = case[4] ** -0.5
    expected = reference_paged_attention(q, kc, vc, meta, scale, window, softcap).float()
    got = paged_attention(q, kc, vc, meta, scale, window, softcap).float()
    assert not torch.isnan(got).any()
    rel = (got - expected).norm() / expected.norm()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5), rel

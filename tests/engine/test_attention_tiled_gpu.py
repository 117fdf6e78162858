"""The query-tiled paged-attention kernel agrees with the PyTorch reference path (CUDA only)."""

import pytest
import torch

from engine.model.attention import (
    AttentionMetadata,
    ForwardContext,
    reference_paged_attention,
    set_forward_context,
)
from engine.model.kernels import kernels_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not kernels_available(), reason="needs CUDA and Triton")]

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def random_step(
    context_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed, pad_tokens=0, pad_seqs=0
):
    """A step over sequences whose blocks are shuffled through the cache; a sequence's new tokens are
    its last ``query_lens[i]`` (a chunk may start mid-sequence). Padding as the engine pads a graph:
    ``pad_seqs`` extra sequence rows seeing one cached token, ``pad_tokens`` tokens at position 0
    spread over them (the last row takes the surplus)."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 5
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # block 0 stays the null block
    batch = len(context_lens)
    tables = torch.zeros(batch + pad_seqs, max(blocks_per_seq), dtype=torch.int64)
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = torch.tensor([order.pop() for _ in range(n)])
    positions, query_seq, query_index = [], [], []
    for i, (c, q) in enumerate(zip(context_lens, query_lens, strict=True)):
        positions += list(range(c - q, c))
        query_seq += [i] * q
        query_index += list(range(q))
    rows = batch + pad_seqs
    for j in range(pad_tokens):
        positions.append(0)
        query_seq.append(min(batch + j, rows - 1))
        query_index.append(0)
    positions, query_seq = torch.tensor(positions), torch.tensor(query_seq)
    slots = tables[query_seq, positions // block_size] * block_size + positions % block_size
    meta = AttentionMetadata(
        slots,
        positions,
        query_seq,
        torch.tensor(query_index),
        tables,
        torch.tensor(list(context_lens) + [1] * pad_seqs),
        max(query_lens),
        max(context_lens),
    )
    meta = AttentionMetadata(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in vars(meta).values()))
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to("cuda", dtype)
    v_cache = torch.randn(shape, generator=g).to("cuda", dtype)
    k_cache[0].zero_()  # padding tokens' slot
    v_cache[0].zero_()
    q = torch.randn(len(positions), heads, head_dim, generator=g).to("cuda", dtype)
    return q, k_cache, v_cache, meta


def mixed_case(seed, num_decode, chunks, heads, kv_heads, head_dim, block_size):
    """``num_decode`` decoding sequences (contexts 1..1024) and prefill chunks ``(context, chunk)``."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, 1025, (num_decode,), generator=g).tolist()
    return (
        ctx + [c for c, _ in chunks],
        [1] * num_decode + [q for _, q in chunks],
        heads,
        kv_heads,
        head_dim,
        block_size,
    )


CASES = [
    # context lens, query lens, heads, kv heads, head dim, block size
    ([300, 64, 1000, 17, 5], [256, 1, 1, 17, 1], 32, 8, 128, 16),  # mixed, GQA 4, chunk with cached context
    ([700, 513], [256, 200], 8, 8, 64, 32),  # chunked prefill, no GQA
    ([129, 40, 1024], [129, 1, 100], 32, 4, 128, 32),  # GQA 8
    ([1, 2, 3, 65, 130], [1, 2, 3, 65, 7], 16, 4, 64, 16),  # tiles of every length
    mixed_case(3, 40, [(512, 256), (96, 96)], 32, 4, 64, 16),  # many decodes + prompts, GQA 8
    mixed_case(4, 24, [(1024, 333)], 16, 16, 128, 32),  # a chunk longer than several tiles
]
VARIANTS = [(None, None), (24, None), (None, 30.0), (100, 50.0)]


def check(q, kc, vc, meta, window, softcap, dtype, **kw):
    from engine.model.attention_kernels import tiled_paged_attention

    scale = q.shape[-1] ** -0.5
    expected = reference_paged_attention(q, kc, vc, meta, scale, window, softcap).float()
    got = tiled_paged_attention(q, kc, vc, meta, scale, window, softcap, **kw).float()
    assert not torch.isnan(got).any()
    rel = (got - expected).norm() / expected.norm()
    assert rel < TOL[dtype], rel


def _params():
    """Each case in bf16 and fp32, plain and with one of window / soft-cap / both; fp16 on two cases."""
    for case in range(len(CASES)):
        special = 1 + case % (len(VARIANTS) - 1)
        for dtype in (torch.bfloat16, torch.float32):
            yield case, dtype, 0
            yield case, dtype, special
        if case < 2:
            yield case, torch.float16, 0


@pytest.mark.parametrize("case,dtype,variant", list(_params()))
def test_tiled_attention_matches_reference(case, dtype, variant):
    q, kc, vc, meta = random_step(*CASES[case], dtype=dtype, seed=case)
    check(q, kc, vc, meta, *VARIANTS[variant], dtype)


@pytest.mark.parametrize("mixed", [True, False])
def test_single_token_tiles_take_either_branch(mixed):
    q, kc, vc, meta = random_step(*CASES[0], dtype=torch.bfloat16, seed=7)
    check(q, kc, vc, meta, None, None, torch.bfloat16, mixed=mixed)


@pytest.mark.parametrize("pad_seqs,pad_tokens", [(3, 3), (2, 9), (0, 5)])
def test_engine_padding_tokens_leave_real_outputs_alone(pad_seqs, pad_tokens):
    """Graph padding: extra rows, and surplus padding tokens piled on the last row (a real one when
    there are no padding rows)."""
    from engine.model.attention_kernels import tiled_paged_attention

    case = ([200, 33, 7], [150, 1, 7], 32, 8, 128, 16)
    q, kc, vc, meta = random_step(
        *case, dtype=torch.bfloat16, seed=11, pad_tokens=pad_tokens, pad_seqs=pad_seqs
    )
    real = sum(case[1])
    expected = reference_paged_attention(q[:real], kc, vc, _head(meta, real, 3), 0.1).float()
    got = tiled_paged_attention(q, kc, vc, meta, 0.1)[:real].float()
    assert (got - expected).norm() / expected.norm() < 1e-2


def _head(meta, tokens, seqs):
    return AttentionMetadata(
        meta.slot_mapping[:tokens],
        meta.positions[:tokens],
        meta.query_seq[:tokens],
        meta.query_index[:tokens],
        meta.block_tables[:seqs],
        meta.context_lens[:seqs],
        meta.max_query_len,
        meta.max_context_len,
    )


def test_dispatch_routes_small_steps_to_split_decode_and_large_to_tiles():
    from engine.model.kernels import paged_attention

    for case in (([900, 20], [1, 1], 32, 8, 128, 16), CASES[4]):
        q, kc, vc, meta = random_step(*case, dtype=torch.bfloat16, seed=5)
        expected = reference_paged_attention(q, kc, vc, meta, 0.1).float()
        got = paged_attention(q, kc, vc, meta, 0.1).float()
        assert (got - expected).norm() / expected.norm() < 1e-2


def test_captured_graph_replays_other_step_layouts():
    """Captured once with placeholder metadata, replayed on different mixes of the same token count:
    the tile table is rebuilt on the device each replay."""
    from engine.model.kernels import paged_attention

    heads, kv_heads, d, bs = 32, 8, 128, 16
    layouts = [
        ([64] * 64 + [300], [1] * 64 + [192], heads, kv_heads, d, bs),
        ([1000, 700], [128, 128], heads, kv_heads, d, bs),
        ([5] * 200 + [90, 60], [1] * 200 + [30, 26], heads, kv_heads, d, bs),
    ]
    steps = [random_step(*c, dtype=torch.bfloat16, seed=i) for i, c in enumerate(layouts)]
    tokens = steps[0][0].shape[0]
    assert all(s[0].shape[0] == tokens for s in steps)
    num_blocks = max(s[1].shape[0] for s in steps)
    width = max(s[3].block_tables.shape[1] for s in steps)
    rows = 256
    kc = torch.zeros(num_blocks, bs, kv_heads, d, dtype=torch.bfloat16, device="cuda")
    vc = torch.zeros_like(kc)
    q = torch.zeros(tokens, heads, d, dtype=torch.bfloat16, device="cuda")
    z = torch.zeros(tokens, dtype=torch.int64, device="cuda")
    meta = AttentionMetadata(
        z.clone(),
        z.clone(),
        torch.arange(tokens, device="cuda").clamp(max=rows - 1),
        z.clone(),
        torch.zeros(rows, width, dtype=torch.int64, device="cuda"),
        torch.ones(rows, dtype=torch.int64, device="cuda"),
        1,
        1,
    )

    def forward():
        set_forward_context(ForwardContext(meta, [(kc, vc)], True))
        try:
            return paged_attention(q, kc, vc, meta, 0.1) + paged_attention(q, kc, vc, meta, 0.1)
        finally:
            set_forward_context(None)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        forward()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = forward()
    torch.cuda.synchronize()
    for sq, skc, svc, smeta in steps:
        kc[: skc.shape[0]].copy_(skc)
        vc[: svc.shape[0]].copy_(svc)
        q.copy_(sq)
        b = smeta.context_lens.shape[0]
        for name in ("slot_mapping", "positions", "query_seq", "query_index"):
            getattr(meta, name).copy_(getattr(smeta, name))
        meta.block_tables.zero_()
        meta.block_tables[:b, : smeta.block_tables.shape[1]] = smeta.block_tables
        meta.context_lens.fill_(1)
        meta.context_lens[:b] = smeta.context_lens
        graph.replay()
        torch.cuda.synchronize()
        expected = 2 * reference_paged_attention(sq, skc, svc, smeta, 0.1).float()
        assert (out.float() - expected).norm() / expected.norm() < 1e-2

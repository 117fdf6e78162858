"""Triton paged attention for CUDA: each query reads its sequence's keys and values straight from the cache.

``paged_attention`` dispatches: in steps with enough (token, KV head) pairs to fill the GPU, the
query-tiled kernel of ``attention_kernels`` takes the tokens of multi-token runs (prompts, chunks:
a tile of a sequence's queries shares each K/V tile) and the per-token kernel below the decoding
tokens (measured faster for them than the tiled kernel's single-token branch); small steps keep
the per-token kernel for all tokens with its split-K (flash-decoding) path.

One program per (query token, KV head) handles all query heads of that KV head (grouped-query
attention without expanding K/V), walks the keys the token may see in tiles through the block
table (any block size, blocks anywhere in the cache), and keeps an online softmax. No mask is
built and nothing is gathered; prefill and decode tokens mix freely in one launch, and the
launch has fixed shapes for a fixed token count, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path in attention.py is used
    triton = None


def kernels_available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        Q,
        K,
        V,
        Out,
        Sinks,
        BlockTables,
        QuerySeq,
        Positions,
        PartialMD,
        PartialAcc,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_slot,
        stride_bt,
        scale,
        softcap,
        window,
        G: tl.constexpr,
        G_PAD: tl.constexpr,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        BS: tl.constexpr,
        TILE: tl.constexpr,
        SOFTCAP: tl.constexpr,
        WINDOW: tl.constexpr,
        IEEE: tl.constexpr,
        SPLITS: tl.constexpr,
        ALONE_ONLY: tl.constexpr = False,
        HAS_SINKS: tl.constexpr = False,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        seq = tl.load(QuerySeq + t)
        pos = tl.load(Positions + t)
        if ALONE_ONLY:  # only tokens that are their sequence's one new token; the tiled kernel takes the rest
            last = tl.num_programs(0) - 1
            prev_same = (t > 0) & (tl.load(QuerySeq + tl.maximum(t - 1, 0)) == seq)
            next_same = (t < last) & (tl.load(QuerySeq + tl.minimum(t + 1, last)) == seq)
            pos = tl.where(prev_same | next_same, -1, pos)  # -1: no keys, nothing stored
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        q = tl.load(
            Q + t * stride_qt + (h * G + g)[:, None] * stride_qh + d[None, :],
            mask=(g[:, None] < G) & d_ok[None, :],
            other=0.0,
        )
        m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
        end = pos + 1
        lo = 0
        if WINDOW:
            lo = tl.maximum(end - window, 0)
        if SPLITS > 1:  # flash-decoding: this program takes one contiguous share of the keys
            share = tl.cdiv(tl.cdiv(end - lo, SPLITS), TILE) * TILE
            lo = lo + split * share
            end = tl.minimum(end, lo + share)
        for start in range(lo, end, TILE):
            kp = start + tl.arange(0, TILE)
            ok = kp < end
            block = tl.load(BlockTables + seq * stride_bt + kp // BS, mask=ok, other=0)
            slot = block.to(tl.int64) * BS + kp % BS
            kv_off = slot[:, None] * stride_slot + h * D + d[None, :]
            k = tl.load(K + kv_off, mask=ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:  # noqa: SIM108 (Triton needs a constexpr branch)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            if SOFTCAP:
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(V + kv_off, mask=ok[:, None] & d_ok[None, :], other=0.0)
            denom = denom * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        heads = h * G + g
        if SPLITS == 1:
            if HAS_SINKS:  # a per-head logit that joins the denominator and attends to nothing
                denom += tl.exp(tl.load(Sinks + heads, mask=g < G, other=0.0) - m)
            out = acc / denom[:, None]
            tl.store(
                Out + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
                out.to(Out.dtype.element_ty),
                mask=(g[:, None] < G) & d_ok[None, :] & (pos + 0 * g >= 0)[:, None],
            )
        else:
            # Partials: running max and denominator per head, unnormalised accumulator.
            n_heads = tl.num_programs(1) * G
            md = PartialMD + ((t * n_heads + heads) * SPLITS + split) * 2
            tl.store(md, m, mask=g < G)
            tl.store(md + 1, denom, mask=g < G)
            tl.store(
                PartialAcc + ((t * n_heads + heads) * SPLITS + split)[:, None] * D_PAD + d[None, :],
                acc,
                mask=g[:, None] < G,
            )

    @triton.jit
    def _combine_splits_kernel(
        PartialMD,
        PartialAcc,
        Out,
        Sinks,
        stride_ot,
        stride_oh,
        H,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        SPLITS: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, D_PAD)
        base = (t * H + h) * SPLITS + sp
        m = tl.load(PartialMD + base * 2)
        denom = tl.load(PartialMD + base * 2 + 1)
        acc = tl.load(PartialAcc + base[:, None] * D_PAD + d[None, :])
        top = tl.max(m, axis=0)
        w = tl.where(m > float("-inf"), tl.exp(m - top), 0.0)
        total = tl.sum(denom * w, axis=0)
        if HAS_SINKS:
            total += tl.exp(tl.load(Sinks + h) - top)
        out = tl.sum(acc * w[:, None], axis=0) / total
        tl.store(Out + t * stride_ot + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d < D)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    impl: str = "auto",
    scratch: dict | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``attention.reference_paged_attention``: [T, heads, head_dim] in and out.

    ``impl``: ``"auto"`` runs tokens that are their sequence's only new token (decode) through the
    per-token kernel and every other token through the query-tiled kernel (``attention_kernels``),
    both launches with fixed grids, or, when a step has so few (token, KV head) pairs that the
    keys are split over programs (flash-decoding, chosen from the token count alone), all tokens
    through the per-token kernel; ``"tiled"`` (one mixed launch) and ``"per_token"`` force one kernel;
    ``"invariant"`` is the per-token kernel without the split, whatever the step: a token's result then
    depends on its own query and keys alone (``engine.model.batch_invariant``).
    ``sinks`` [heads]: a logit per head that joins each softmax's denominator (gpt-oss).
    """
    if sinks is not None:
        sinks = sinks.float().contiguous()
    num_tokens, heads, head_dim = query.shape
    if query.stride(2) != 1:
        query = query.contiguous()
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    splits = _num_splits(num_tokens * kv_heads, query.device) if num_tokens and impl != "invariant" else 1
    if impl == "tiled":
        from engine.model.attention_kernels import tiled_paged_attention

        return tiled_paged_attention(
            query, k_cache, v_cache, meta, scaling, sliding_window, softcap, scratch=scratch, sinks=sinks
        )
    out = torch.empty((num_tokens, heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    split_runs = impl == "auto" and splits == 1
    if split_runs:  # tiles of several tokens here; single-token runs (decode) in the per-token kernel below
        from engine.model.attention_kernels import tiled_paged_attention

        tiled_paged_attention(
            query,
            k_cache,
            v_cache,
            meta,
            scaling,
            sliding_window,
            softcap,
            out=out,
            skip_alone=True,
            scratch=scratch,
            sinks=sinks,
        )
    d_pad = triton.next_power_of_2(head_dim)
    if splits > 1:
        partial_md = torch.empty((num_tokens, heads, splits, 2), dtype=torch.float32, device=query.device)
        partial_acc = torch.empty(
            (num_tokens, heads, splits, d_pad), dtype=torch.float32, device=query.device
        )
    else:
        partial_md = partial_acc = out
    tile = 64 if d_pad <= 128 else 32
    fp32 = query.dtype == torch.float32
    if fp32:
        tile = 32 if d_pad <= 64 else 16
    _paged_attention_kernel[(num_tokens, kv_heads, splits)](
        query,
        k_cache,
        v_cache,
        out,
        sinks if sinks is not None else out,
        meta.block_tables,
        meta.query_seq,
        meta.positions,
        partial_md,
        partial_acc,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_heads * head_dim,
        meta.block_tables.stride(0),
        float(scaling),
        float(softcap or 0.0),
        int(sliding_window or 0),
        G=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        D=head_dim,
        D_PAD=d_pad,
        BS=block_size,
        TILE=tile,
        SOFTCAP=bool(softcap),
        WINDOW=bool(sliding_window),
        IEEE=fp32,
        SPLITS=splits,
        ALONE_ONLY=split_runs,
        HAS_SINKS=sinks is not None,
        num_warps=4,
    )
    if splits > 1:
        _combine_splits_kernel[(num_tokens, heads)](
            partial_md,
            partial_acc,
            out,
            sinks if sinks is not None else out,
            out.stride(0),
            out.stride(1),
            heads,
            D=head_dim,
            D_PAD=d_pad,
            SPLITS=splits,
            HAS_SINKS=sinks is not None,
        )
    return out


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(programs: int, device: torch.device) -> int:
    """Split each query's keys over more programs when there are too few (query, KV head) pairs
    to fill the GPU (decode at small batch, long contexts)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= 2 * sms:
        return 1
    return min(16, triton.next_power_of_2(-(-4 * sms // programs)))

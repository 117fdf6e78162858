"""Triton paged attention for CUDA: each query reads its sequence's keys and values straight from the cache.

One program per (query token, KV head) handles all query heads of that KV head (grouped-query
attention without expanding K/V), walks the keys the token may see in tiles through the block
table (any block size, blocks anywhere in the cache), and keeps an online softmax. No mask is
built and nothing is gathered; prefill and decode tokens mix freely in one launch, and the
launch has fixed shapes for a fixed token count, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

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
        BlockTables,
        QuerySeq,
        Positions,
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
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        seq = tl.load(QuerySeq + t)
        pos = tl.load(Positions + t)
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
        for start in range((lo // TILE) * TILE, end, TILE):
            kp = start + tl.arange(0, TILE)
            ok = (kp < end) & (kp >= lo)
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
        out = acc / denom[:, None]
        tl.store(
            Out + t * stride_ot + (h * G + g)[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=(g[:, None] < G) & d_ok[None, :],
        )


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same contract as ``attention.reference_paged_attention``: [T, heads, head_dim] in and out."""
    num_tokens, heads, head_dim = query.shape
    if query.stride(2) != 1:
        query = query.contiguous()
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    out = torch.empty((num_tokens, heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    d_pad = triton.next_power_of_2(head_dim)
    tile = 64 if d_pad <= 128 else 32
    fp32 = query.dtype == torch.float32
    if fp32:
        tile = 32 if d_pad <= 64 else 16
    _paged_attention_kernel[(num_tokens, kv_heads)](
        query,
        k_cache,
        v_cache,
        out,
        meta.block_tables,
        meta.query_seq,
        meta.positions,
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
        num_warps=4,
    )
    return out

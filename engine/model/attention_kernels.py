"""Query-tiled paged attention for CUDA (FlashAttention-2 style over the block table).

A program takes a tile of up to ``BLOCK_M`` consecutive query tokens of one sequence and one
KV head with all its query heads (grouped-query attention without expanding K/V): it loads
each K/V tile from the paged cache once for the whole query tile, masks causally per query
(a query at position ``p`` sees keys ``0..p``, within the sliding window if any), and keeps
an online softmax in fp32. A tile of a single token (a decoding sequence) takes a lean branch
of the same kernel with only the group's rows, so prefill chunks and decode tokens can share
one launch; ``kernels.paged_attention`` instead sends a sequence's only new token to the
per-token kernel (``skip_alone`` here), which measured faster for decode.

The program-to-tile mapping is built on the device (``_tile_table_kernel``) from
``query_seq`` alone: a tile starts where a sequence's run of tokens starts and every
``BLOCK_M`` tokens into it. The grid is ``min(T, ceil(T / BLOCK_M) + B)`` by the KV heads for
``T`` tokens and ``B`` sequence rows, surplus programs exit at once, and no host value that
changes per step enters the launch, so it can be captured in a CUDA graph for a padded token
count. A sequence's tokens must be contiguous in the step (as the engine lays them out).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path in attention.py is used
    triton = None

_LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _tile_table_kernel(
        QuerySeq, Tiles, num_tokens, num_slots, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr
    ):
        """One program: ``Tiles[j]`` is the first token of tile ``j``; ``num_tokens`` fills the rest."""
        first_carry = tl.zeros([], dtype=tl.int32)
        count = tl.zeros([], dtype=tl.int32)
        for c in range(0, num_tokens, CHUNK):
            t = c + tl.arange(0, CHUNK)
            ok = t < num_tokens
            seq = tl.load(QuerySeq + t, mask=ok, other=-1)
            prev = tl.load(QuerySeq + t - 1, mask=ok & (t > 0), other=-1)
            run_start = ok & (seq != prev)
            first = tl.associative_scan(tl.where(run_start, t, first_carry), 0, _max_combine)
            start = ok & ((t - first) % BLOCK_M == 0)
            flags = start.to(tl.int32)
            idx = count + tl.cumsum(flags, 0) - 1
            tl.store(Tiles + idx, t, mask=start & (idx < num_slots))
            count += tl.sum(flags, 0)
            first_carry = tl.max(first, 0)
        for c in range(count, num_slots + 1, CHUNK):
            i = c + tl.arange(0, CHUNK)
            tl.store(Tiles + i, num_tokens + tl.zeros([CHUNK], dtype=tl.int32), mask=i < num_slots + 1)

    @triton.jit
    def _kv_tile(
        K,
        V,
        table,
        q,
        pos,
        m,
        denom,
        acc,
        start,
        hi,
        h,
        d,
        d_ok,
        stride_slot,
        scale,
        softcap,
        window,
        D: tl.constexpr,
        BS: tl.constexpr,
        BN: tl.constexpr,
        SOFTCAP: tl.constexpr,
        WINDOW: tl.constexpr,
        IEEE: tl.constexpr,
        MASKED: tl.constexpr,
    ):
        """One K/V tile of the online softmax; unmasked tiles are visible to every row."""
        kp = start + tl.arange(0, BN)
        if MASKED:
            k_ok = kp < hi
            block = tl.load(table + kp // BS, mask=k_ok, other=0)
            kv_mask = k_ok[:, None] & d_ok[None, :]
        else:
            block = tl.load(table + kp // BS)
            kv_mask = d_ok[None, :]
        slot = block.to(tl.int64) * BS + kp % BS
        kv_off = slot[:, None] * stride_slot + h * D + d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        if IEEE:  # noqa: SIM108 (Triton needs a constexpr branch)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            s = s * scale
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            s = s * 1.4426950408889634
        else:
            s = s * (scale * 1.4426950408889634)
        if MASKED:
            visible = kp[None, :] <= pos[:, None]
            if WINDOW:
                visible = visible & (kp[None, :] > pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m - m_use)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        denom = denom * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, denom, acc

    @triton.jit
    def _attend_tile(
        Q,
        K,
        V,
        Out,
        Sinks,
        BlockTables,
        Positions,
        t0,
        n,
        seq,
        h,
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
        GP: tl.constexpr,
        ROWS: tl.constexpr,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        BS: tl.constexpr,
        BN: tl.constexpr,
        SOFTCAP: tl.constexpr,
        WINDOW: tl.constexpr,
        IEEE: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        """Attention of ``n`` tokens from ``t0`` (one sequence) for KV head ``h``: row = token * GP + head."""
        r = tl.arange(0, ROWS)
        i = r // GP
        g = r % GP
        row_ok = (i < n) & (g < G)
        tok = (t0 + i).to(tl.int64)
        heads = h * G + g
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        q = tl.load(
            Q + tok[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        pos = tl.load(Positions + tok, mask=row_ok, other=0)
        hi = tl.max(pos, 0) + 1
        lo = 0
        if WINDOW:
            lo = tl.maximum(tl.min(tl.where(row_ok, pos, hi), 0) - window + 1, 0)
        m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
        table = BlockTables + seq * stride_bt
        full_hi = lo
        if not WINDOW:  # keys every row of the tile sees need no mask: 0..min(pos), whole tiles of them
            full_hi = (tl.min(tl.where(row_ok, pos, hi), 0) + 1) // BN * BN
            for start in range(0, full_hi, BN):
                m, denom, acc = _kv_tile(
                    K, V, table, q, pos, m, denom, acc, start, hi, h, d, d_ok,
                    stride_slot, scale, softcap, window,
                    D, BS, BN, SOFTCAP, WINDOW, IEEE, False,
                )  # fmt: skip
        for start in range(full_hi, hi, BN):
            m, denom, acc = _kv_tile(
                K, V, table, q, pos, m, denom, acc, start, hi, h, d, d_ok,
                stride_slot, scale, softcap, window,
                D, BS, BN, SOFTCAP, WINDOW, IEEE, True,
            )  # fmt: skip
        if HAS_SINKS:  # a per-head logit that joins the denominator and attends to nothing
            sink = tl.load(Sinks + heads, mask=row_ok, other=0.0)
            denom += tl.math.exp2(sink * 1.4426950408889634 - m)
        out = acc / denom[:, None]
        tl.store(
            Out + tok[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )

    @triton.jit
    def _tiled_attention_kernel(
        Q,
        K,
        V,
        Out,
        Sinks,
        BlockTables,
        QuerySeq,
        Positions,
        Tiles,
        num_tokens,
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
        GP: tl.constexpr,
        ROWS: tl.constexpr,
        DECODE_ROWS: tl.constexpr,
        D: tl.constexpr,
        D_PAD: tl.constexpr,
        BS: tl.constexpr,
        BN: tl.constexpr,
        DECODE_BN: tl.constexpr,
        SOFTCAP: tl.constexpr,
        WINDOW: tl.constexpr,
        IEEE: tl.constexpr,
        DECODE_N: tl.constexpr,
        SKIP_ALONE: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        h = tl.program_id(1)
        t0 = tl.load(Tiles + pid)
        n = tl.load(Tiles + pid + 1) - t0
        seq = tl.load(QuerySeq + tl.minimum(t0, num_tokens - 1))
        if SKIP_ALONE:  # a sequence's only new token is left to the per-token kernel
            last = num_tokens - 1
            prev_same = (t0 > 0) & (tl.load(QuerySeq + tl.minimum(tl.maximum(t0 - 1, 0), last)) == seq)
            next_same = (t0 < last) & (tl.load(QuerySeq + tl.minimum(t0 + 1, last)) == seq)
            n = tl.where((n == 1) & ~prev_same & ~next_same, 0, n)
        if n > 0:
            if n == DECODE_N:  # a decoding sequence: only the group's rows
                _attend_tile(
                    Q, K, V, Out, Sinks, BlockTables, Positions, t0, n, seq, h,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_slot, stride_bt,
                    scale, softcap, window,
                    G, GP, DECODE_ROWS, D, D_PAD, BS, DECODE_BN, SOFTCAP, WINDOW, IEEE, HAS_SINKS,
                )  # fmt: skip
            else:
                _attend_tile(
                    Q, K, V, Out, Sinks, BlockTables, Positions, t0, n, seq, h,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_slot, stride_bt,
                    scale, softcap, window,
                    G, GP, ROWS, D, D_PAD, BS, BN, SOFTCAP, WINDOW, IEEE, HAS_SINKS,
                )  # fmt: skip


def tile_rows(group: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M query tokens per tile, rows of a prefill tile = BLOCK_M x padded group)."""
    gp = triton.next_power_of_2(group)
    rows = 64 if dtype == torch.float32 else 128
    block_m = max(1, rows // gp)
    return block_m, max(16, block_m * gp)


def build_tile_table(query_seq: torch.Tensor, num_seqs: int, block_m: int) -> torch.Tensor:
    """Device tile table for a step: int32 [slots + 1], first token of each tile, then ``T`` (end marker)."""
    num_tokens = query_seq.shape[0]
    slots = min(num_tokens, -(-num_tokens // block_m) + num_seqs)
    tiles = torch.empty(slots + 1, dtype=torch.int32, device=query_seq.device)
    _tile_table_kernel[(1,)](query_seq, tiles, num_tokens, slots, BLOCK_M=block_m, CHUNK=1024, num_warps=4)
    return tiles


def _tiles_for(meta, block_m: int, cache: dict | None) -> torch.Tensor:
    """The step's tile table, built once per forward pass (inside a captured graph, too) and shared by
    layers through ``cache`` (the forward pass's scratch dict; None builds it every call)."""
    key = ("attention_tiles", block_m)
    if cache is not None and key in cache:
        return cache[key]
    tiles = build_tile_table(meta.query_seq, meta.context_lens.shape[0], block_m)
    if cache is not None:
        cache[key] = tiles
    return tiles


def tiled_paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    *,
    mixed: bool = True,
    skip_alone: bool = False,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    scratch: dict | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``attention.reference_paged_attention``: [T, heads, head_dim] in and out.

    ``skip_alone`` leaves the tokens that are their sequence's only new token unwritten in
    ``out`` (the per-token kernel takes them); ``mixed=False`` runs single-token tiles through the
    prefill tile shape too (for measuring). ``sinks`` [heads]: gpt-oss's attention sinks.
    """
    num_tokens, heads, head_dim = query.shape
    if query.stride(2) != 1:
        query = query.contiguous()
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if out is None:
        out = torch.empty((num_tokens, heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    fp32 = query.dtype == torch.float32
    d_pad = triton.next_power_of_2(head_dim)
    gp = triton.next_power_of_2(group)
    block_m, rows = tile_rows(group, query.dtype)
    if fp32:
        bn, decode_bn = (32 if d_pad <= 64 else 16), (32 if d_pad <= 64 else 16)
    else:
        bn, decode_bn = (64 if d_pad <= 128 else 32), (64 if d_pad <= 128 else 32)
    tiles = _tiles_for(meta, block_m, scratch)
    if num_warps is None:  # measured on an H200 (python -m bench.scripts.bench_attention): 4 warps, 2 stages
        num_warps = 4
    if num_stages is None:
        num_stages = 2
    _tiled_attention_kernel[(tiles.shape[0] - 1, kv_heads)](
        query,
        k_cache,
        v_cache,
        out,
        sinks.float().contiguous() if sinks is not None else out,
        meta.block_tables,
        meta.query_seq,
        meta.positions,
        tiles,
        num_tokens,
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
        GP=gp,
        ROWS=rows,
        DECODE_ROWS=max(16, gp),
        D=head_dim,
        D_PAD=d_pad,
        BS=block_size,
        BN=bn,
        DECODE_BN=decode_bn,
        SOFTCAP=bool(softcap),
        WINDOW=bool(sliding_window),
        IEEE=fp32,
        DECODE_N=1 if mixed else 0,  # 0: no tile has it, every tile takes the prefill shape
        SKIP_ALONE=skip_alone,
        HAS_SINKS=sinks is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out

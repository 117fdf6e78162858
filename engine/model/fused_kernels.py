"""Fused elementwise kernels for the decoder layer: RMSNorm (optionally after a residual add),
SiLU-and-multiply, and rotary embedding with the KV-cache write.

Each op has a Triton kernel for CUDA and a PyTorch version for CPU that repeats transformers'
own operations. The kernels round to the model's dtype wherever transformers' eager code
does, so a fused layer differs from transformers' only in the order of a reduction's sums.
On a decode step of a few dozen tokens every kernel is launch-bound: replacing the eight
kernels of an RMSNorm or the ten of a rotary embedding with one is what saves the time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.kernels import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(
        X,
        Res,
        W,
        Out,
        ResOut,
        stride_x,
        stride_res,
        stride_out,
        stride_res_out,
        n_cols,
        eps,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = Out.dtype.element_ty
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            r = tl.load(Res + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + r).to(dtype).to(tl.float32)
            tl.store(ResOut + row * stride_res_out + cols, x.to(dtype), mask=mask)
        var = tl.sum(x * x, axis=0) / n_cols
        y = (x * (1.0 / tl.sqrt(var + eps))).to(dtype).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out + row * stride_out + cols, (w * y).to(dtype), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(X, Out, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        dtype = Out.dtype.element_ty
        gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(Out + row * stride_out + cols, (act * up).to(dtype), mask=mask)

    @triton.jit
    def _rotate(x1, x2, c1, c2, s1, s2, dtype: tl.constexpr):
        # transformers: q * cos + rotate_half(q) * sin, each product and the sum rounded to dtype
        o1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        o2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        return o1.to(dtype), o2.to(dtype)

    @triton.jit
    def _rope_and_cache_kernel(
        Q,
        K,
        V,
        Cos,
        Sin,
        SlotMapping,
        QOut,
        KCache,
        VCache,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_vt,
        stride_vh,
        stride_ct,
        stride_st,
        stride_ot,
        stride_oh,
        stride_slot,
        stride_ch,
        NUM_Q_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        HALF_PAD: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, HALF_PAD)
        mask = offs < HALF
        dtype = QOut.dtype.element_ty
        c1 = tl.load(Cos + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(Cos + t * stride_ct + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(Sin + t * stride_st + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(Sin + t * stride_st + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        if h < NUM_Q_HEADS:
            src = Q + t * stride_qt + h * stride_qh
            x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            o1, o2 = _rotate(x1, x2, c1, c2, s1, s2, dtype)
            dst = QOut + t * stride_ot + h * stride_oh
            tl.store(dst + offs, o1, mask=mask)
            tl.store(dst + HALF + offs, o2, mask=mask)
        else:
            kh = h - NUM_Q_HEADS
            slot = tl.load(SlotMapping + t)
            src = K + t * stride_kt + kh * stride_kh
            x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
            o1, o2 = _rotate(x1, x2, c1, c2, s1, s2, dtype)
            dst = KCache + slot * stride_slot + kh * stride_ch
            tl.store(dst + offs, o1.to(KCache.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + offs, o2.to(KCache.dtype.element_ty), mask=mask)
            vsrc = V + t * stride_vt + kh * stride_vh
            vdst = VCache + slot * stride_slot + kh * stride_ch
            v1 = tl.load(vsrc + offs, mask=mask, other=0.0)
            v2 = tl.load(vsrc + HALF + offs, mask=mask, other=0.0)
            tl.store(vdst + offs, v1.to(VCache.dtype.element_ty), mask=mask)
            tl.store(vdst + HALF + offs, v2.to(VCache.dtype.element_ty), mask=mask)


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D tensor of rows with unit column stride (a view when possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' ``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`` over the last dim."""
    if not _use_triton(x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    n = rows.shape[1]
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, rows, weight, out, out, rows.stride(0), 0, out.stride(0), 0, n, eps,
        HAS_RES=False, BLOCK=block, num_warps=_norm_warps(block),
    )  # fmt: skip
    return out.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` and ``rms_norm(s)``, returned as ``(normed, s)``."""
    if not _use_triton(x):
        summed = residual + x
        return rms_norm(summed, weight, eps), summed
    rows, res = _rows(x), _rows(residual)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    n = rows.shape[1]
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res, weight, out, summed, rows.stride(0), res.stride(0), out.stride(0), summed.stride(0), n, eps,
        HAS_RES=True, BLOCK=block, num_warps=_norm_warps(block),
    )  # fmt: skip
    return out.view(x.shape), summed.view(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x`` is ``[..., 2 * n]`` = gate then up."""
    n = x.shape[-1] // 2
    if not _use_triton(x):
        return F.silu(x[..., :n]) * x[..., n:]
    rows = _rows(x)
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](
        rows, out, rows.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out.view(*x.shape[:-1], n)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_and_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """Rotate ``q`` [T, H, D] and ``k`` [T, KVH, D] by ``cos``/``sin`` [T, D]; store the rotated
    keys and ``v`` at ``slot_mapping`` in the paged cache; return the rotated queries [T, H, D]."""
    if not _use_triton(q):
        c, s = cos[:, None, :], sin[:, None, :]
        q_rot = (q * c) + (_rotate_half(q) * s)
        k_rot = (k * c) + (_rotate_half(k) * s)
        kvh, d = k_cache.shape[-2:]
        k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k_rot.to(k_cache.dtype))
        v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return q_rot
    tokens, heads, d = q.shape
    kv_heads = k.shape[1]
    if d % 2 or cos.shape[-1] != d or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"rope_and_cache needs an even head dim with unit stride and cos of width {d}")
    q_out = torch.empty((tokens, heads, d), dtype=q.dtype, device=q.device)
    kc, vc = k_cache.view(-1, kv_heads, d), v_cache.view(-1, kv_heads, d)
    half = d // 2
    _rope_and_cache_kernel[(tokens, heads + kv_heads)](
        q, k, v, cos, sin, slot_mapping, q_out, kc, vc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), sin.stride(0), q_out.stride(0), q_out.stride(1), kc.stride(0), kc.stride(1),
        NUM_Q_HEADS=heads, HALF=half, HALF_PAD=triton.next_power_of_2(half), num_warps=1,
    )  # fmt: skip
    return q_out

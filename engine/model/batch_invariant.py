"""Batch-invariant execution (``EngineConfig.batch_invariant``): a row's logits do not depend on the
other rows of its step.

By default the GPU's results depend on the step's shape: cuBLAS picks its kernel, tiling and split-K
by the matmul's row count, the attention splits a query's keys over more programs when a step has
few tokens and sends prompt tokens through another kernel than decode tokens, and CUDA-graph
padding changes the row count again. Each choice changes the order of a reduction's sums, so the
same request gets logits that differ in the last bits from one batch to another, and in bf16 a
near-tie then flips and the continuation differs.

In this mode every reduction a row goes through has an order fixed by the model and the row alone:

- every ``F.linear`` of the forward pass (projections, MLP, LM head) runs :func:`linear`, a Triton
  matmul whose tiles and K loop are chosen from the weight's shape only (never the row count; no
  split-K), so an output element is the same dot product in the same order at any batch size;
- attention runs the per-token kernel for every token, decode and prompt alike, without the
  flash-decoding split: a query walks its keys in tiles of a fixed size from position 0, so a
  prompt token's result is the same whether its prompt came in one chunk, in several, or was a
  decode step;
- RMSNorm, rotary, SiLU and the fused sampler already run one program per row.

Only the decoder layers this project fuses (``engine.model.fusion``: Llama, Mistral, Qwen2, Qwen3)
are covered: every operation of theirs is one of the above. Other families run transformers'
PyTorch code, whose reductions are not controlled, and are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from engine.model.kernels import triton

if triton is not None:
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])
    def _matmul_kernel(
        A,
        B,
        Bias,
        C,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bn,
        stride_bk,
        stride_cm,
        stride_cn,
        HAS_BIAS: tl.constexpr,
        IEEE: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """``C = A @ B.T (+ bias)``: one program per [BM, BN] tile, K walked in order in BK steps."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BM)
        tiles_n = tl.cdiv(N, BN)
        # Grouped order: programs that run together share B tiles in L2.
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptr = A + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
        b_ptr = B + rn[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            k_ok = rk < K - k * BK
            a = tl.load(a_ptr, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr, mask=(rn[None, :] < N) & k_ok[:, None], other=0.0)
            if IEEE:  # noqa: SIM108 (Triton needs a constexpr branch)
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptr += BK * stride_ak
            b_ptr += BK * stride_bk
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        c = C + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
        tl.store(c, acc.to(C.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul_config(n: int, k: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options for a weight of ``n`` rows and ``k`` columns: a function of the
    weight alone, so every row count runs the same instructions per output element.

    Measured on an H200 (``python -m bench.scripts.bench_invariant_matmul --sweep``): 128 x 128 tiles
    with 8 warps are the fastest at 2,048 rows for every projection of Llama-3.2-1B and Llama-3-8B,
    and for the wide weights (gate/up, LM head) at 256 rows; narrow weights keep 64 x 64 tiles, which
    give a decode step of a few hundred rows enough programs to fill the GPU."""
    if dtype == torch.float32:
        return dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=3)
    if n > 4096:
        return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)
    return dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=4)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """``F.linear`` with a reduction order that does not depend on ``x``'s row count (CUDA, Triton).

    ``config`` replaces :func:`matmul_config`'s choice (for measuring other tile sizes)."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    out = torch.empty((rows.shape[0], out_features), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        cfg = config or matmul_config(out_features, in_features, weight.dtype)
        grid = (triton.cdiv(rows.shape[0], cfg["BM"]) * triton.cdiv(out_features, cfg["BN"]),)
        _matmul_kernel[grid](
            rows, weight, bias if bias is not None else out, out,
            rows.shape[0], out_features, in_features,
            rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, IEEE=weight.dtype == torch.float32, GROUP_M=8, **cfg,
        )  # fmt: skip
    return out.view(*x.shape[:-1], out_features)


class BatchInvariantMode(TorchFunctionMode):
    """Within it, ``F.linear`` on CUDA runs :func:`linear` (the engine enters it around a step's forward
    pass, CUDA-graph captures included)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.is_cuda and weight.dim() == 2 and x.dtype == weight.dtype:
                return linear(x, weight, bias)
        return func(*args, **kwargs)


def check_supported(model: torch.nn.Module, fused_layers: int, use_kernels: bool) -> None:
    """Refuse a model or device the batch-invariant mode cannot make invariant, saying why."""
    layers = len(getattr(getattr(model, "model", None), "layers", []))
    if layers == 0 or fused_layers != layers:
        family = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(
            f"batch_invariant covers the decoder layers the engine fuses (Llama, Mistral, Qwen2, Qwen3 with "
            f"fused_kernels=true); model family {family!r} has {fused_layers} of {layers} layers fused"
        )
    if not use_kernels:
        raise ValueError(
            "batch_invariant needs a CUDA GPU with Triton (on CPU, in float32, the engine's results already "
            "do not depend on the batch: see the README's section on reproducibility)"
        )

"""CUDA kernel time of a workload's steps by kernel (eager, sync mode), to see where a step's time goes.

Usage (on a GPU machine):
    python -m bench.scripts.profile_decode_step [--workload w3] [--warm-steps 100] [--steps 10]
        [--attention auto|per_token] [--sampler fused|reference] [--temperature 1 --top-p 0.95]
        [--batch-invariant]

``--attention per_token`` sends every token through the per-token kernel (the layout before the
query-tiled prefill kernel), ``--sampler reference`` samples with the sorting PyTorch sampler: the
same steps profiled both ways show what each change gained.
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.profiler import ProfilerActivity, profile

from bench.workloads import WORKLOADS
from engine import EngineConfig, LLMEngine, SamplingParams, build_random_model


def force_attention_impl(impl: str) -> None:
    """Make the attention entry call ``paged_attention`` with ``impl`` (it imports it at call time)."""
    import engine.model.kernels as kernels

    kernels.paged_attention = functools.partial(kernels.paged_attention, impl=impl)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="w1", choices=["w1", "w2", "w3"])
    parser.add_argument("--warm-steps", type=int, default=100, help="steps run before the profiled ones")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attention", default="auto", choices=["auto", "per_token", "tiled"])
    parser.add_argument("--sampler", default="fused", choices=["fused", "reference"])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-invariant", action="store_true", help="the engine's batch-invariant mode")
    args = parser.parse_args(argv)

    if args.attention != "auto":
        force_attention_impl(args.attention)
    workload = WORKLOADS[args.workload]
    model = build_random_model(workload.model_config(), "bfloat16", "cuda")
    config = EngineConfig(
        mode="sync",
        cuda_graphs=False,
        fused_sampler=args.sampler == "fused",
        batch_invariant=args.batch_invariant,
        **workload.engine,
    )
    engine = LLMEngine(model, None, config)
    for i, (prompt, new) in enumerate(workload.requests()):
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=new, ignore_eos=True, seed=i
        )
        engine.add_request(str(i), prompt, params)
    for _ in range(args.warm_steps):
        engine.step()
    torch.cuda.synchronize()
    engine.pop_step_records()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    records = engine.pop_step_records()
    events = prof.key_averages()
    total_us = sum(e.self_device_time_total for e in events) / args.steps
    print(
        f"{args.workload} steps {args.warm_steps}..{args.warm_steps + args.steps}, attention={args.attention}, "
        f"sampler={args.sampler}, temperature={args.temperature}, top_p={args.top_p}: "
        f"{total_us / 1000:.2f} ms of kernel time per step; per step "
        f"{sum(r.num_seqs for r in records) / len(records):.0f} sequences, "
        f"{sum(r.decode_tokens for r in records) / len(records):.0f} decode and "
        f"{sum(r.prefill_tokens for r in records) / len(records):.0f} prefill tokens"
    )
    for name, us in kernel_groups(events, args.steps).items():
        print(f"  {name:<12} {us / 1000:7.3f} ms per step ({100 * us / max(total_us, 1e-9):4.1f}%)")
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))


GROUPS = (
    ("attention", ("paged_attention", "tiled_attention", "combine_splits", "tile_table")),
    ("sampler", ("pass1", "radix", "topk_draw", "check_round", "_final_kernel", "sampl")),
    ("matmul", ("nvjet", "gemm", "cutlass", "sm90", "sm80", "xmma", "cublas")),
    ("fused", ("rms_norm", "rope", "silu")),
)


def kernel_groups(events, steps: int) -> dict[str, float]:
    """Kernel time per step (us) by kind, from the kernels' names; the rest is ``other``."""
    out = {name: 0.0 for name, _ in GROUPS} | {"other": 0.0}
    for e in events:
        name = e.key.lower()
        kind = next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")
        out[kind] += e.self_device_time_total / steps
    return out


if __name__ == "__main__":
    main()

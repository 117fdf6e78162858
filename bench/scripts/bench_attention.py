"""Micro-benchmark of the paged-attention kernels on one layer call: per-token kernel vs query-tiled.

Steps (Llama-3-8B attention shapes by default: 32 query heads, 8 KV heads, head dim 128, bf16):

- ``prefill``: 8 sequences, each a 256-token chunk ending at contexts 256..1024 (a W3 prefill-heavy step);
- ``decode``: 256 sequences, one token each, contexts uniform 64..1024;
- ``mixed``: 4 such chunks and 192 decoding sequences in one step.

Each call is timed alone with CUDA events after an L2 flush (a layer's KV is not in L2 in a real
step). Reported: microseconds per call (median), the KV bytes that must move (each visible key
and value once, plus queries and outputs) over that time, and the attention FLOPs (4 x query
heads x head dim per visible (query, key) pair) over it.

    python -m bench.scripts.bench_attention [--steps prefill decode mixed] [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch

from engine.model.attention import AttentionMetadata, reference_paged_attention
from engine.model.attention_kernels import tiled_paged_attention
from engine.model.kernels import paged_attention


def make_step(context_lens, query_lens, heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """Random queries and cache on the GPU; each sequence's blocks shuffled through the cache."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks) + 1
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=g) + 1
    tables = torch.zeros(len(context_lens), max(blocks), dtype=torch.int64, device="cuda")
    at = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = perm[at : at + n]
        at += n
    ql = torch.tensor(query_lens, device="cuda")
    cl = torch.tensor(context_lens, device="cuda")
    query_seq = torch.repeat_interleave(torch.arange(len(query_lens), device="cuda"), ql)
    cu = torch.cumsum(ql, 0) - ql
    query_index = torch.arange(query_seq.shape[0], device="cuda") - cu[query_seq]
    positions = (cl - ql)[query_seq] + query_index
    slots = tables[query_seq, positions // block_size] * block_size + positions % block_size
    meta = AttentionMetadata(
        slots, positions, query_seq, query_index, tables, cl, max(query_lens), max(context_lens)
    )
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    q = torch.randn(query_seq.shape[0], heads, head_dim, device="cuda", dtype=dtype, generator=g)
    return q, k, v, meta


def work(q, k, meta) -> tuple[float, float]:
    """(bytes that must move, FLOPs) of one call."""
    heads, d = q.shape[1:]
    kv_heads = k.shape[2]
    visible = (meta.positions + 1).sum().item()
    kv = int(meta.context_lens.sum().item()) * kv_heads * d * 2 * k.element_size()
    return kv + 2 * q.numel() * q.element_size(), 4.0 * visible * heads * d


def time_call(fn, reps: int = 30) -> float:
    flush = torch.empty(512 * 2**20, dtype=torch.int8, device="cuda")
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def steps(names):
    ctx8 = [256 + 768 * i // 7 for i in range(8)]
    g = torch.Generator().manual_seed(0)
    dec = torch.randint(64, 1025, (256,), generator=g).tolist()
    out = {
        "prefill": (ctx8, [256] * 8),
        "decode": (dec, [1] * 256),
        "mixed": (ctx8[::2] + dec[:192], [256] * 4 + [1] * 192),
    }
    return {n: out[n] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", nargs="+", default=["prefill", "decode", "mixed"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="also time num_warps / num_stages / branch variants")
    args = ap.parse_args()
    dtype = torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()}  heads {args.heads}/{args.kv_heads}  d {args.head_dim}")
    for name, (ctx, ql) in steps(args.steps).items():
        q, k, v, meta = make_step(ctx, ql, args.heads, args.kv_heads, args.head_dim, args.block_size, dtype)
        scale = args.head_dim**-0.5
        nbytes, flops = work(q, k, meta)
        ref = reference_paged_attention(q, k, v, meta, scale).float()
        args_ = (q, k, v, meta, scale)
        variants = {
            "per_token": functools.partial(paged_attention, *args_, impl="per_token"),
            "tiled (one launch)": functools.partial(paged_attention, *args_, impl="tiled"),
            "auto (tiled + per-token)": functools.partial(paged_attention, *args_),
        }
        if args.sweep:
            for w, s in ((4, 3), (8, 2)):
                variants[f"tiled w{w} s{s}"] = functools.partial(
                    tiled_paged_attention, *args_, num_warps=w, num_stages=s
                )
        print(
            f"\n{name}: {q.shape[0]} tokens, {len(ctx)} seqs, KV+Q+O {nbytes / 1e6:.1f} MB, {flops / 1e9:.2f} GFLOP"
        )
        for label, fn in variants.items():
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                us = time_call(fn)
            except Exception as e:  # a variant that does not compile (shared memory) is reported, not fatal
                print(f"  {label:26s} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            print(
                f"  {label:26s} {us:9.1f} us  {nbytes / us / 1e3:7.0f} GB/s  {flops / us / 1e6:6.1f} TFLOP/s"
                f"  rel err {err:.1e}"
            )


if __name__ == "__main__":
    main()

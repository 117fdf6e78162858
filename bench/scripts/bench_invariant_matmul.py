"""Time the batch-invariant matmul against cuBLAS on the projections of the benchmark models.

Usage (on a GPU machine):
    python -m bench.scripts.bench_invariant_matmul [--rows 32 256 2048] [--sweep]

For each weight shape (q/k/v, o, gate/up, down, LM head of Llama-3.2-1B and Llama-3-8B) and row
count, prints cuBLAS (``F.linear``) and ``batch_invariant.linear`` in microseconds. ``--sweep``
also times other tile configurations and prints, per shape and row count, the three fastest
(times at every row count), and the one with the least total time (a config may depend on the weight's shape only, never on the row count).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from engine.model.batch_invariant import linear, matmul_config

SHAPES = {
    "1B qkv": (3072, 2048),
    "1B o": (2048, 2048),
    "1B gate_up": (16384, 2048),
    "1B down": (2048, 8192),
    "1B lm_head": (128256, 2048),
    "8B qkv": (6144, 4096),
    "8B o": (4096, 4096),
    "8B gate_up": (28672, 4096),
    "8B down": (4096, 14336),
    "8B lm_head": (128256, 4096),
}


def time_us(fn, reps: int = 20) -> float:
    """GPU time of one call: ``reps`` calls captured in a CUDA graph and replayed (no launch overhead)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def candidates() -> list[dict]:
    out = []
    for bm, bn, bk, warps, stages in itertools.product(
        (64, 128), (32, 64, 128, 256), (64, 128), (4, 8), (3, 4, 5)
    ):
        smem = (bm + bn) * bk * 2 * stages
        if smem > 200_000:
            continue  # more shared memory than an SM has
        out.append(dict(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 256, 2048])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args(argv)
    dtype = torch.bfloat16
    for name in args.shapes:
        n, k = SHAPES[name]
        weight = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
        xs = {m: torch.randn(m, k, device="cuda", dtype=dtype) for m in args.rows}
        cublas = {m: time_us(lambda x=x, w=weight: F.linear(x, w)) for m, x in xs.items()}
        ours = {m: time_us(lambda x=x, w=weight: linear(x, w)) for m, x in xs.items()}
        cells = "  ".join(
            f"M={m}: {cublas[m]:7.1f} / {ours[m]:7.1f} us ({ours[m] / cublas[m]:.2f}x)" for m in xs
        )
        print(f"{name:12s} {matmul_config(n, k, dtype)}  cuBLAS / invariant  {cells}", flush=True)
        if not args.sweep:
            continue
        timed = []
        for cfg in candidates():
            try:
                times = [
                    time_us(lambda x=x, c=cfg, w=weight: linear(x, w, config=c), reps=10) for x in xs.values()
                ]
            except Exception as exc:  # a config the GPU cannot run (shared memory)
                print(f"  {cfg}: {type(exc).__name__}", flush=True)
                continue
            timed.append((times, cfg))
        for i, m in enumerate(xs):
            for times, cfg in sorted(timed, key=lambda t, i=i: t[0][i])[:3]:
                cells = " ".join(f"{t:7.1f}" for t in times)
                print(f"  best at M={m}: {cells} us  {cfg}", flush=True)
        times, cfg = min(timed, key=lambda t: sum(t[0]))
        print(f"  best in total: {' '.join(f'{t:7.1f}' for t in times)} us  {cfg}", flush=True)


if __name__ == "__main__":
    main()

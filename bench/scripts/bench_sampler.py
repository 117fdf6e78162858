"""Time the reference sampler against the fused Triton sampler (CUDA events over CUDA-graph replays).

Also times sampling under token masks (constrained rows) and the top-k selection of
``top_logprobs``.

Usage (on a GPU machine): python -m bench.scripts.bench_sampler [--rows 256] [--vocab 128256]
"""

from __future__ import annotations

import argparse

import torch

from engine.runner.sampler import SamplingTensors, TokenMask, sample, top_logprobs
from engine.runner.sampler_kernel import sample_fused

CONFIGS = {
    # name: temperature, top_k, top_p
    "greedy": (0.0, 0, 1.0),
    "temperature 1.0, top_p 0.95": (1.0, 0, 0.95),
    "temperature 1.0, top_k 50": (1.0, 50, 1.0),
}


def logits_of(kind: str, rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """'normal': N(0, 1) logits; 'peaked': N(0, 2) with a few strongly favoured tokens per row."""
    g = torch.Generator(device="cuda").manual_seed(0)
    if kind == "normal":
        return torch.randn(rows, vocab, generator=g, device="cuda").to(dtype)
    logits = torch.randn(rows, vocab, generator=g, device="cuda") * 2
    ids = torch.randint(0, vocab, (rows, 4), generator=g, device="cuda")
    logits.scatter_add_(1, ids, torch.tensor([12.0, 10.0, 9.0, 7.0], device="cuda").expand(rows, 4))
    return logits.to(dtype)


def tensors(rows: int, temperature: float, top_k: int, top_p: float) -> SamplingTensors:
    def full(value, dtype):
        return torch.full((rows,), value, dtype=dtype, device="cuda")

    return SamplingTensors(
        temperature=full(temperature, torch.float32),
        top_k=full(top_k, torch.int64),
        top_p=full(top_p, torch.float32),
        min_p=full(0.0, torch.float32),
        seed=torch.arange(rows, device="cuda") * 7919 + 12345,
        position=full(1000, torch.int64),
        suppress=torch.full((rows, 16), -1, dtype=torch.int64, device="cuda"),
        any_sampling=temperature > 0,
        any_top_k_top_p=temperature > 0 and (top_k > 0 or top_p < 1),
        any_min_p=False,
    )


def time_ms(fn, repeat: int = 20) -> float:
    """Milliseconds per call, from a CUDA graph of ``repeat`` calls replayed a few times."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(repeat):
                fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128_256)
    args = parser.parse_args()
    print(f"rows {args.rows}, vocab {args.vocab}, logprobs on; ms per call")
    print(f"{'logits':<15} {'config':<30} {'reference':>10} {'kernel':>8} {'speed-up':>9}")
    for dtype in (torch.bfloat16, torch.float32):
        for kind in ("normal", "peaked"):
            logits = logits_of(kind, args.rows, args.vocab, dtype)
            for name, (temperature, top_k, top_p) in CONFIGS.items():
                st = tensors(args.rows, temperature, top_k, top_p)
                ref = time_ms(lambda logits=logits, st=st: sample(logits, st, True))
                ker = time_ms(lambda logits=logits, st=st: sample_fused(logits, st, True))
                label = f"{kind} {str(dtype).removeprefix('torch.')}"
                print(f"{label:<15} {name:<30} {ref:>10.3f} {ker:>8.3f} {ref / ker:>8.1f}x")
    st = tensors(args.rows, 1.0, 0, 0.95)
    logits = logits_of("peaked", args.rows, args.vocab, torch.bfloat16)
    lp_off = time_ms(lambda: sample_fused(logits, st, False))
    print(f"kernel without logprobs (peaked bf16, top_p 0.95): {lp_off:.3f} ms")
    masked(args.rows, args.vocab)
    topk(args.rows, args.vocab)


def masked(rows: int, vocab: int) -> None:
    """Every row under a token mask allowing 1% of the vocabulary (as a JSON grammar inside a string)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    words = torch.randint(
        -(2**31), 2**31 - 1, (rows, -(-vocab // 32)), generator=g, device="cuda", dtype=torch.int32
    )
    sparse = torch.rand(words.shape, generator=g, device="cuda") < 0.08
    mask = TokenMask(torch.arange(rows, device="cuda"), torch.where(sparse, words, 0))
    logits = logits_of("normal", rows, vocab, torch.bfloat16)
    for name, (temperature, top_k, top_p) in CONFIGS.items():
        st = tensors(rows, temperature, top_k, top_p)
        ref = time_ms(lambda st=st: sample(logits, st, True, mask=mask))
        ker = time_ms(lambda st=st: sample_fused(logits, st, True, mask=mask))
        print(f"{'masked bf16':<15} {name:<30} {ref:>10.3f} {ker:>8.3f} {ref / ker:>8.1f}x")


def topk(rows: int, vocab: int) -> None:
    """The selection of ``top_logprobs`` (one ``torch.topk`` per row, on the logits in their dtype)."""
    logits = logits_of("normal", rows, vocab, torch.bfloat16)
    st = tensors(rows, 0.0, 0, 1.0)
    tokens, lps = sample_fused(logits, st, True)
    for k in (20, 100):
        ids = torch.empty(rows, k, dtype=torch.int32, device="cuda")
        out = torch.empty(rows, k, dtype=torch.float32, device="cuda")
        t = time_ms(lambda ids=ids, out=out: top_logprobs(logits, ids, out, tokens, lps))
        print(f"top_logprobs k={k}: {t:.3f} ms")


if __name__ == "__main__":
    main()

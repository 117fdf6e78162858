"""Benchmark workloads (W1, W2, smoke) and a runner that measures our engine on them.

Models are randomly initialised at real shapes; requests are random token ids with exact
output lengths (EOS ignored), so every run generates the same number of tokens.
"""

from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig

from engine import EngineConfig, LLMEngine, SamplingParams, build_random_model

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
LLAMA32_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=2048,
    max_position_embeddings=1024,
)


@dataclass(frozen=True)
class Workload:
    """A model shape and a fixed set of requests."""

    name: str
    model: dict
    num_requests: int
    prompt_len: tuple[int, int]
    new_tokens: tuple[int, int]
    seed: int = 0
    engine: dict = field(default_factory=dict)

    def requests(self) -> list[tuple[list[int], int]]:
        rng = random.Random(self.seed)
        vocab = self.model["vocab_size"]
        out = []
        for _ in range(self.num_requests):
            n = rng.randint(*self.prompt_len)
            out.append(([rng.randrange(3, vocab) for _ in range(n)], rng.randint(*self.new_tokens)))
        return out

    def model_config(self) -> LlamaConfig:
        return LlamaConfig(**self.model, eos_token_id=2, bos_token_id=1, pad_token_id=0)


WORKLOADS = {
    "w1": Workload("w1", LLAMA3_8B, 32, (256, 256), (1024, 1024), engine=dict(max_num_seqs=32)),
    "w2": Workload("w2", LLAMA32_1B, 1024, (64, 512), (64, 512), engine=dict(max_num_seqs=256)),
    "smoke": Workload("smoke", TINY, 12, (4, 40), (4, 24), engine=dict(max_num_seqs=8, cpu_kv_cache_gb=0.05)),
}


@dataclass
class EngineResult:
    mode: str
    wall_s: float
    generated_tokens: int
    gpu_busy: float
    steps: int
    startup_s: float
    capture_s: float
    peak_memory_gb: float
    mean_prep_ms: float = 0.0
    mean_compute_ms: float = 0.0
    records: list = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0


def run_engine(workload: Workload, model, mode: str, warmup: bool = True) -> EngineResult:
    """Build an engine over ``model``, warm it up, then time the workload once."""
    t0 = time.perf_counter()
    cfg = EngineConfig(mode=mode, **workload.engine)
    engine = LLMEngine(model, None, cfg)
    startup = time.perf_counter() - t0 - engine.graph_capture_s
    t1 = time.perf_counter()
    if warmup:
        for i, (prompt, _) in enumerate(workload.requests()[:4]):
            engine.add_request(
                f"warmup-{i}", prompt, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
            )
        while engine.has_unfinished_requests():
            engine.step()
    capture = engine.graph_capture_s + time.perf_counter() - t1
    engine.reset_stats()
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    requests = workload.requests()
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += len(out.token_ids)
    wall = time.perf_counter() - start
    summary = engine.summary()
    records = engine.pop_step_records()
    prep = 1000 * sum(r.cpu_prep_s for r in records) / max(1, len(records))
    compute = 1000 * sum(r.gpu_compute_s for r in records) / max(1, len(records))
    peak = torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda" else 0.0
    engine.close()
    del engine
    gc.collect()
    result = EngineResult(
        mode, wall, generated, summary.gpu_busy, summary.steps, startup, capture, peak, prep, compute, records
    )
    return result


def main(name: str = "w2", modes: tuple[str, ...] = ("async", "sync")) -> list[EngineResult]:
    workload = WORKLOADS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    model = build_random_model(workload.model_config(), "bfloat16" if device == "cuda" else "float32", device)
    print(f"{name}: model built in {time.perf_counter() - t:.1f}s", flush=True)
    results = []
    for mode in modes:
        r = run_engine(workload, model, mode)
        results.append(r)
        print(
            f"{name} {mode:5s} wall {r.wall_s:7.2f}s  {r.tokens_per_s:9.1f} tok/s  gpu_busy {r.gpu_busy:6.2%}  "
            f"steps {r.steps}  tokens {r.generated_tokens}  startup {r.startup_s:.1f}s  capture {r.capture_s:.1f}s  "
            f"peak {r.peak_memory_gb:.1f} GiB  prep {r.mean_prep_ms:.2f} ms/step  compute {r.mean_compute_ms:.2f} ms/step",
            flush=True,
        )
    return results


if __name__ == "__main__":
    import sys

    main(*(sys.argv[1:2] or ["w2"]))

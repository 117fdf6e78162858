"""Benchmark workloads (W1, W2, W2s, W3, W70B, smoke) and a runner that measures our engine on them.

Models are randomly initialised at real shapes; requests are random token ids with exact
output lengths (EOS ignored), so every run generates the same number of tokens. With tensor
parallelism each rank builds only its shard of the model (per-parameter random weights, seed 0).

    python -m bench.workloads w2                       # one GPU, async then sync
    python -m bench.workloads w3 --modes async
    python -m bench.workloads w70b --tp 2 --modes async
    python -m bench.workloads w2 --top-logprobs 20    # + the 20 most likely tokens per generated token
    python -m bench.workloads w2 --json-schema w2 [--guided-fraction 0.5] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, PreTrainedModel

from bench.floor import weight_bytes
from bench.guided_workload import QWEN2_VOCAB, GuidedCounts, GuidedLoad, guided_load
from engine import CompletionOutput, EngineConfig, LLMEngine, SamplingParams, build_random_model
from jobs.errors import JobError

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
LLAMA3_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
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
    sampling: dict = field(default_factory=dict)
    """SamplingParams fields of every request (greedy by default); EOS is ignored but by guided requests."""
    guided: GuidedLoad | None = None
    """A JSON schema on some requests (``bench.guided_workload``)."""

    def params(self, max_new_tokens: int, index: int = 0) -> SamplingParams:
        base = {"temperature": 0.0} | self.sampling
        if self.guided is not None and self.guided.is_guided(index):
            return SamplingParams(**base, max_new_tokens=max_new_tokens, json_schema=self.guided.schema)
        return SamplingParams(**base, max_new_tokens=max_new_tokens, ignore_eos=True)

    def requests(self, count: int | None = None, seed: int | None = None) -> list[tuple[list[int], int]]:
        """(prompt ids, new tokens) of each request; other ``seed`` values give other requests of the same shape."""
        rng = random.Random(self.seed if seed is None else seed)
        vocab = self.model["vocab_size"]
        out = []
        for _ in range(self.num_requests if count is None else count):
            n = rng.randint(*self.prompt_len)
            out.append(([rng.randrange(3, vocab) for _ in range(n)], rng.randint(*self.new_tokens)))
        return out

    def model_config(self) -> LlamaConfig:
        if self.guided is not None:  # the tokenizer's vocabulary and EOS
            eos = self.guided.tokenizer().eos_token_id
            model = self.model | {"vocab_size": QWEN2_VOCAB}
            return LlamaConfig(**model, eos_token_id=eos, bos_token_id=None, pad_token_id=0)
        return LlamaConfig(**self.model, eos_token_id=2, bos_token_id=1, pad_token_id=0)

    def meta_model(self, dtype: torch.dtype, tensor_parallel_size: int = 1) -> PreTrainedModel:
        """The model (rank 0's shard with tensor parallelism) on the ``meta`` device: shapes and bytes only."""
        from engine.build import meta_model

        return meta_model(self.model_config(), dtype, tensor_parallel_size)


WORKLOADS = {
    "w1": Workload("w1", LLAMA3_8B, 32, (256, 256), (1024, 1024), engine=dict(max_num_seqs=32)),
    "w2": Workload("w2", LLAMA32_1B, 1024, (64, 512), (64, 512), engine=dict(max_num_seqs=256)),
    # W2 sampled, as users run it: temperature 1.0, top_p 0.95
    "w2s": Workload(
        "w2s",
        LLAMA32_1B,
        1024,
        (64, 512),
        (64, 512),
        engine=dict(max_num_seqs=256),
        sampling=dict(temperature=1.0, top_p=0.95),
    ),
    # W2 with the chosen token's logprob on every request (its cost against W2)
    "w2l": Workload(
        "w2l",
        LLAMA32_1B,
        1024,
        (64, 512),
        (64, 512),
        engine=dict(max_num_seqs=256),
        sampling=dict(logprobs=True),
    ),
    # Llama-3-8B shape, 1024 requests, prompt and output lengths uniform 64..1024: many sequences decode together
    # while prefill chunks ride along, as users' batches do.
    "w3": Workload("w3", LLAMA3_8B, 1024, (64, 1024), (64, 1024), engine=dict(max_num_seqs=256)),
    # Llama-3-70B shape (141 GB of bf16 weights: tensor parallel over 2+ H200s, 4+ H100s); 64 requests decode
    # together in every step, 256-token prompts x exactly 256 new tokens.
    "w70b": Workload("w70b", LLAMA3_70B, 64, (256, 256), (256, 256), engine=dict(max_num_seqs=64)),
    "smoke": Workload("smoke", TINY, 12, (4, 40), (4, 24), engine=dict(max_num_seqs=8, cpu_kv_cache_gb=0.05)),
}


def check_fits(
    workload: Workload, dtype: torch.dtype, tensor_parallel_size: int, device: torch.device
) -> None:
    """JobError if a GPU cannot hold its part of the weights (90% of its memory, leaving some for the cache)."""
    if device.type != "cuda":
        return
    per_gpu = weight_bytes(workload.meta_model(dtype, tensor_parallel_size))
    total = torch.cuda.get_device_properties(device).total_memory
    if per_gpu > 0.9 * total:
        raise JobError(
            f"{workload.name}: {per_gpu / 1e9:.0f} GB of weights per GPU at tensor_parallel_size="
            f"{tensor_parallel_size} do not fit a {total / 1e9:.0f} GB GPU: use a larger tensor_parallel_size (engine.tensor_parallel_size=N, --tp N)"
        )


def open_engine(
    workload: Workload, model: PreTrainedModel | None, cfg: EngineConfig, dtype: str
) -> LLMEngine:
    """An engine over ``model`` (one GPU), or with ``cfg.tensor_parallel_size`` > 1 a tensor-parallel
    group whose ranks each build their shard of the workload's model (rank 0's engine returned)."""
    from engine.build import build_engine

    if cfg.tensor_parallel_size == 1:
        assert model is not None
        return build_engine(model, workload.guided.tokenizer() if workload.guided else None, cfg)
    return build_engine(workload.model_config(), None, cfg, dtype=dtype, seed=0)


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
    output_bytes: int = 0
    """Bytes of what the engine hands back per sample: token ids (int32), logprobs and top alternatives."""
    guided: GuidedCounts | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.output_bytes / self.generated_tokens if self.generated_tokens else 0.0


def output_bytes(out: CompletionOutput) -> int:
    """A sample's output as stored: 4 bytes per token id and per logprob, 8 per top alternative."""
    size = 4 * len(out.token_ids) + (4 * len(out.logprobs) if out.logprobs is not None else 0)
    if out.top_token_ids is not None:
        size += out.top_token_ids.nbytes + out.top_logprobs.nbytes
    return size


def run_engine(
    workload: Workload,
    model: PreTrainedModel | None,
    mode: str,
    warmup: bool = True,
    tensor_parallel_size: int = 1,
    dtype: str = "bfloat16",
    requests: list[tuple[list[int], int]] | None = None,
    ready: Callable[[], None] | None = None,
    max_num_seqs: int | None = None,
) -> EngineResult:
    """Build an engine over ``model``, warm it up, then time the workload once.

    With ``tensor_parallel_size`` > 1, ``model`` is None: the ranks build the workload's model
    (in ``dtype``) and the start-up time includes that build. ``requests``: a part of the
    workload's (all by default); ``ready`` is called after the warm-up, just before the timing starts;
    ``max_num_seqs`` replaces the workload's (a comparison at another system's concurrency).
    """
    t0 = time.perf_counter()
    settings = workload.engine | ({"max_num_seqs": max_num_seqs} if max_num_seqs is not None else {})
    cfg = EngineConfig(mode=mode, tensor_parallel_size=tensor_parallel_size, **settings)
    engine = open_engine(workload, model, cfg, dtype)
    startup = time.perf_counter() - t0 - engine.graph_capture_s
    t1 = time.perf_counter()
    if warmup:
        # Prompts that are not timed (so the prefix cache holds none of the timed ones), with the
        # workload's sampling (so its graphs are captured before the timing starts). A guided workload
        # warms up a full batch whose lengths step down, so that the graphs of its constrained steps (one
        # per batch size) are captured too.
        count = cfg.max_num_seqs if workload.guided else 4
        warm = workload.requests(count=count, seed=workload.seed + 1)
        for i, (prompt, _) in enumerate(warm):
            if workload.guided:
                prompt, new = prompt[:64], 2 + (count - i) // 4
            else:
                new = 8
            engine.add_request(f"warmup-{i}", prompt, workload.params(new, i))
        while engine.has_unfinished_requests():
            engine.step()
        if (
            not workload.guided
        ):  # the graphs of the workload's sampling at every batch size, as greedy's at start
            engine.capture_graphs_for(workload.params(8))
    capture = engine.graph_capture_s + time.perf_counter() - t1
    engine.reset_stats()
    on_cuda = engine.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    requests = workload.requests() if requests is None else requests
    if ready is not None:
        ready()
    guided = GuidedCounts() if workload.guided else None
    mask_before = (engine.guided.fill_s, engine.guided.rows_filled) if engine.guided else (0.0, 0)
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(str(i), prompt, workload.params(n, i))
    generated = out_bytes = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            generated += len(out.token_ids)
            out_bytes += output_bytes(out)
            if guided is not None and workload.guided.is_guided(int(out.request_id)):
                guided.add(out.finish_reason, out.text)
    wall = time.perf_counter() - start
    if guided is not None and engine.guided is not None:
        guided.mask_s = engine.guided.fill_s - mask_before[0]
        guided.masked_rows = engine.guided.rows_filled - mask_before[1]
    summary = engine.summary()
    records = engine.pop_step_records()
    prep = 1000 * sum(r.cpu_prep_s for r in records) / max(1, len(records))
    compute = 1000 * sum(r.gpu_compute_s for r in records) / max(1, len(records))
    peak = torch.cuda.max_memory_allocated(engine.device) / 2**30 if on_cuda else 0.0
    engine.close()
    del engine
    gc.collect()
    result = EngineResult(
        mode, wall, generated, summary.gpu_busy, summary.steps, startup, capture, peak, prep, compute, records
    )
    result.output_bytes = out_bytes
    result.guided = guided
    return result


def main(
    name: str = "w2",
    modes: tuple[str, ...] = ("async", "sync"),
    tensor_parallel_size: int = 1,
    max_num_seqs: int | None = None,
    top_logprobs: int = 0,
    guided: GuidedLoad | None = None,
    batch_invariant: bool = False,
) -> list[EngineResult]:
    """Run workload ``name`` in each engine mode and print one line per mode.

    ``top_logprobs`` > 0: every request also asks for that many top alternatives per token (the
    engine's ``max_top_logprobs`` set to it); the line reports the output bytes per generated token.

    With ``tensor_parallel_size`` > 1 each mode starts its own tensor-parallel group (rank r on GPU
    r), whose ranks build their shards; its start-up time includes that build. ``guided``: a JSON
    schema on some of the requests (one GPU). ``batch_invariant``: the engine's batch-invariant mode.
    """
    workload = WORKLOADS[name]
    if max_num_seqs is not None:  # the same requests at another concurrency
        workload = dataclasses.replace(workload, engine=workload.engine | {"max_num_seqs": max_num_seqs})
        name = f"{name}@{max_num_seqs}"
    if top_logprobs:
        workload = with_top_logprobs(workload, top_logprobs)
        name = f"{name}+top{top_logprobs}"
    if batch_invariant:
        workload = dataclasses.replace(workload, engine=workload.engine | {"batch_invariant": True})
        name = f"{name}+invariant"
    if guided is not None:
        if tensor_parallel_size > 1:
            raise JobError("--json-schema runs on one GPU (constrained decoding is not tensor parallel yet)")
        workload = dataclasses.replace(workload, guided=guided)
        name = f"{name}+{guided.label()}"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    tp = tensor_parallel_size
    check_fits(workload, getattr(torch, dtype), tp, device)
    model = None
    if tp == 1:
        t = time.perf_counter()
        model = build_random_model(workload.model_config(), dtype, device)
        print(f"{name}: model built in {time.perf_counter() - t:.1f}s", flush=True)
    results = []
    label = f"{name} tp{tp}" if tp > 1 else name
    for mode in modes:
        r = run_engine(workload, model, mode, tensor_parallel_size=tp, dtype=dtype)
        results.append(r)
        print(
            f"{label} {mode:5s} wall {r.wall_s:7.2f}s  {r.tokens_per_s:9.1f} tok/s  gpu_busy {r.gpu_busy:6.2%}  "
            f"steps {r.steps}  tokens {r.generated_tokens}  startup {r.startup_s:.1f}s  capture {r.capture_s:.1f}s  "
            f"peak {r.peak_memory_gb:.1f} GiB  prep {r.mean_prep_ms:.2f} ms/step  compute {r.mean_compute_ms:.2f} ms/step  "
            f"out {r.bytes_per_token:.0f} B/tok" + (f"  {r.guided.summary(r.steps)}" if r.guided else ""),
            flush=True,
        )
    return results


def with_top_logprobs(workload: Workload, k: int) -> Workload:
    """``workload`` whose requests each ask for ``k`` top alternatives per token (the engine's limit set to k)."""
    return dataclasses.replace(
        workload,
        sampling=workload.sampling | {"top_logprobs": k},
        engine=workload.engine | {"max_top_logprobs": k},
    )


def cli(argv: list[str] | None = None) -> list[EngineResult]:
    """``python -m bench.workloads [name] [--tp N] [--modes async,sync] [--max-num-seqs N] [--top-logprobs K] [--batch-invariant]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.workloads", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", default="w2", choices=sorted(WORKLOADS))
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (rank r on GPU r)")
    parser.add_argument("--modes", default="async,sync", help="engine modes, comma-separated")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="override the workload's max_num_seqs")
    parser.add_argument(
        "--top-logprobs", type=int, default=0, help="every request asks for K top alternatives per token"
    )
    parser.add_argument(
        "--json-schema",
        default=None,
        help="constrain requests to this JSON schema file ('w2': bench.json_schemas.W2_SCHEMA); "
        "runs with the Qwen2 tokenizer and vocabulary",
    )
    parser.add_argument(
        "--guided-fraction", type=float, default=1.0, help="the share of requests constrained (0: a baseline)"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="the Qwen2 tokenizer folder (default: BATCHGEN_QWEN2_TOKENIZER)"
    )
    parser.add_argument(
        "--batch-invariant", action="store_true", help="run the engine in its batch-invariant mode"
    )
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = set(modes) - {"async", "sync"}
    if bad or not modes:
        parser.error(f"--modes: use async and/or sync, got {args.modes!r}")
    if args.top_logprobs < 0:
        parser.error(f"--top-logprobs: use K >= 0, got {args.top_logprobs}")
    guided = None
    if args.json_schema is not None:
        try:
            guided = guided_load(args.json_schema, args.guided_fraction, args.tokenizer)
        except (OSError, ValueError) as e:
            parser.error(f"--json-schema: {e}")
    return main(args.name, modes, args.tp, args.max_num_seqs, args.top_logprobs, guided, args.batch_invariant)


if __name__ == "__main__":
    cli()

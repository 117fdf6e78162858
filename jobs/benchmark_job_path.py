"""``bench=job``: the job path as users run it, against the engine alone on the same requests.

Writes a random-weight Qwen2-1.5B-shaped model folder with the real Qwen2 tokenizer and a few
thousand instruction prompts, runs the real ``synthetic_data`` job over them (sampled, EOS
ignored, so every run makes the same number of tokens), then the engine alone on the very token
ids the job built, in the same process and with the same engine settings. Set-up is excluded on
both sides alike: each engine is built and warmed up (its sampling graphs captured) on other
prompts before its timing starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose

from bench.job_workload import write_model_folder, write_prompts
from engine.build import build_engine
from engine.config import ModelConfig
from engine.sampling_params import SamplingParams
from jobs.cli import to_run_config
from jobs.config import RunConfig
from jobs.generate import load_engine, run_generation
from jobs.pipeline.prompts import PromptBuilder
from jobs.pipeline.shards import resolve_shard
from jobs.pipeline.sources import open_source, select_rows

log = logging.getLogger(__name__)
TINY_QWEN2 = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)


def _warm_up(engine: Any, params: SamplingParams) -> Any:
    """A few untimed requests with the run's sampling and the graphs of its sampling at every size, then fresh stats."""
    warm = dataclasses.replace(params, n=1, max_new_tokens=8)
    for i in range(8):
        engine.add_request(f"warmup-{i}", f"Warm-up request {i}: say something.", warm)
    while engine.has_unfinished_requests():
        engine.step()
    engine.capture_graphs_for(params)
    engine.reset_stats()
    return engine


def run_job_path(cfg: RunConfig) -> dict[str, Any]:
    """Run both sides; print and write ``benchmark.json`` into ``run_dir``."""
    b = cfg.bench
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = {} if b.job_model == "qwen2-1.5b" else TINY_QWEN2
    model_dir = write_model_folder(
        Path(cfg.models_dir) / f"{b.job_model}-random", Path(b.tokenizer_dir), device, **shape
    )
    prompts = write_prompts(out / "prompts.jsonl", b.num_prompts)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    job_cfg = to_run_config(
        compose(
            "config",
            overrides=[
                "job=synthetic_data",
                "model=hf",
                f"model.model={model_dir}",
                f"model.dtype={dtype}",
                "data=jsonl",
                f"data.path={prompts}",
                "data.id_column=id",
                "job.sampling.n=1",
                f"job.sampling.temperature={b.temperature}",
                f"job.sampling.top_p={b.top_p}",
                f"job.sampling.max_new_tokens={b.max_new_tokens}",
                "job.sampling.ignore_eos=true",
                f"run_dir={out / 'job'}",
                "overwrite=true",
                "runner.progress=false",
            ],
        )
    )
    job_cfg = dataclasses.replace(job_cfg, engine=cfg.engine)
    params = job_cfg.job.sampling

    engines: list[Any] = []

    def factory(c: RunConfig) -> Any:
        engines.append(_warm_up(load_engine(c), params))
        return engines[-1]

    stats = run_generation(job_cfg, make_engine=factory)
    job_engine = engines[0]
    tokenizer = job_engine.tokenizer
    job_engine.close()
    del job_engine, engines[:]

    # The engine alone, on the token ids the job's prompt builder made from the same rows.
    builder = PromptBuilder(job_cfg.job.prompt, job_cfg.data, params, tokenizer)
    source = open_source(job_cfg.data, ["prompt", "id"])
    rows = select_rows(source, job_cfg.data.limit, resolve_shard(job_cfg.shard))
    specs = [builder.build(row, builder.row_id(row)) for row in rows]
    engine = _warm_up(
        build_engine(ModelConfig(model=str(model_dir), dtype=dtype), tokenizer, job_cfg.engine), params
    )
    start = time.perf_counter()
    for spec in specs:
        engine.add_request(spec.id, spec.token_ids, spec.params)
    generated = 0
    while engine.has_unfinished_requests():
        generated += sum(len(o.token_ids) for o in engine.step())
    wall = time.perf_counter() - start
    alone_busy = engine.summary().gpu_busy
    engine.close()

    alone_tps = generated / wall
    result = {
        "requests": len(specs),
        "engine": dataclasses.asdict(job_cfg.engine),
        "sampling": dataclasses.asdict(params),
        "job": {
            "wall_s": stats.wall_s,
            "generated_tokens": stats.completion_tokens,
            "tokens_per_s": stats.tokens_per_s,
            "gpu_busy": stats.gpu_busy,
        },
        "engine_alone": {
            "wall_s": wall,
            "generated_tokens": generated,
            "tokens_per_s": alone_tps,
            "gpu_busy": alone_busy,
        },
        "job_vs_engine": stats.tokens_per_s / alone_tps if alone_tps else 0.0,
    }
    (out / "benchmark.json").write_text(json.dumps(result, indent=1) + "\n")
    busy = "device busy" if device.type == "cpu" else "GPU busy"
    print(f"| system | requests | generated tokens | wall | tok/s | {busy} |")
    print("|---|---|---|---|---|---|")
    for name, r in (("job (synthetic_data)", result["job"]), ("engine alone", result["engine_alone"])):
        print(
            f"| {name} | {len(specs)} | {r['generated_tokens']} | {r['wall_s']:.2f} s | "
            f"{r['tokens_per_s']:,.0f} | {100 * (r['gpu_busy'] or 0):.1f}% |"
        )
    print(f"job / engine alone: {result['job_vs_engine']:.3f}")
    return result

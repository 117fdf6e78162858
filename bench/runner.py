"""The benchmark: our engine (async and sync) and transformers' continuous batching on one workload, in one process.

It measures the device's copy bandwidth, computes the workload's memory-bandwidth floor, and
writes one table (printed, and as JSON and Arrow) with wall time, generated tokens/s, GPU busy,
fraction of the floor and speed-up over transformers' best configuration measured in the same run.

With ``tensor_parallel_size`` N > 1 our engine runs over GPUs 0..N-1 (each rank builds its own
shard; the floor is then per GPU: its shard of the weights and its KV heads, at one GPU's copy
rate). transformers runs afterwards on GPU 0 with the same per-parameter weights, or is skipped
with a note when the whole model does not fit one GPU.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from bench.floor import measure_copy_bandwidth, weight_bytes, workload_floor
from bench.transformers_baseline import CONFIGS, run_transformers
from bench.workloads import Workload, check_fits, run_engine
from engine import build_random_model
from jobs.reporting.report_file import write_report

HF_MEMORY_SHARE = 0.8
"""transformers runs only when the whole model takes at most this share of one GPU's memory."""

COLUMNS = [
    "system",
    "requests",
    "wall_s",
    "generated_tokens",
    "tokens_per_s",
    "gpu_busy",
    "fraction_of_floor",
    "speedup_vs_transformers",
    "startup_s",
    "capture_s",
    "peak_memory_gb",
    "note",
]


def run_benchmark(
    workload: Workload,
    out_dir: Path,
    modes: tuple[str, ...] = ("async", "sync"),
    transformers: tuple[str, ...] | None = None,
    transformers_max_requests: int | None = None,
    transformers_max_new_tokens: int | None = None,
    report: bool = True,
    tensor_parallel_size: int = 1,
) -> dict:
    """Run everything; write ``benchmark.json``, ``benchmark.arrow``, per-mode step records and timing reports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    tp = tensor_parallel_size
    check_fits(workload, getattr(torch, dtype), tp, device)
    t = time.perf_counter()
    # One GPU: the model, shared by every run. Tensor parallel: each mode's ranks build their shards.
    model = build_random_model(workload.model_config(), dtype, device) if tp == 1 else None
    model_build_s = time.perf_counter() - t if tp == 1 else None
    requests = workload.requests()
    max_seqs = workload.engine.get("max_num_seqs", 256)
    bandwidth = measure_copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
    shard = model if tp == 1 else workload.meta_model(getattr(torch, dtype), tp)
    floor = workload_floor(shard, requests, max_seqs, bandwidth, kv_split=tp)

    rows = []
    suffix = f" (TP={tp})" if tp > 1 else ""
    for mode in modes:
        r = run_engine(workload, model, mode, tensor_parallel_size=tp, dtype=dtype)
        _write_steps(out_dir / f"steps_{mode}.arrow", r.records)
        if report and r.records:
            write_report(
                [out_dir / f"steps_{mode}.arrow"],
                out_dir,
                f"{workload.name}: engine {mode}",
                prefix=f"{mode}_",
            )
        rows.append(
            dict(
                system=f"engine {mode}{suffix}",
                requests=len(requests),
                wall_s=r.wall_s,
                generated_tokens=r.generated_tokens,
                tokens_per_s=r.tokens_per_s,
                gpu_busy=r.gpu_busy,
                startup_s=r.startup_s,
                capture_s=r.capture_s,
                peak_memory_gb=r.peak_memory_gb,
                note=f"{r.steps} steps, CPU prep {r.mean_prep_ms:.2f} ms/step, "
                f"GPU compute {r.mean_compute_ms:.2f} ms/step"
                + (
                    f", tensor parallel over {tp} GPUs (start-up includes the ranks' model build)"
                    if tp > 1
                    else ""
                ),
            )
        )

    hf_requests = requests[:transformers_max_requests] if transformers_max_requests else requests
    # generate_batch takes one max_new_tokens for all requests: the baseline generates exactly ``cap`` per request
    # (the workload's mean by default) and is compared by tokens/s.
    cap = transformers_max_new_tokens or round(sum(n for _, n in requests) / len(requests))
    hf_requests = [(p, cap) for p, _ in hf_requests]
    labels = [(label, fields) for label, fields in CONFIGS if transformers is None or label in transformers]
    hf_note = None if labels else "transformers not run (bench.transformers is empty)"
    if labels and model is None:
        model, hf_note = _single_gpu_model(workload, dtype, device)
    for label, fields in labels if model is not None else []:
        b = run_transformers(model, hf_requests, label, fields, cap)
        rows.append(
            dict(
                system=label,
                requests=len(hf_requests),
                wall_s=b.wall_s,
                generated_tokens=b.generated_tokens,
                tokens_per_s=b.tokens_per_s,
                note=b.error or b.settings,
            )
        )

    floor_tps = sum(n for _, n in requests) / floor.seconds
    hf_best = max((r["tokens_per_s"] for r in rows if r["system"].startswith("transformers")), default=0.0)
    for r in rows:
        r["fraction_of_floor"] = r["tokens_per_s"] / floor_tps
        r["speedup_vs_transformers"] = r["tokens_per_s"] / hf_best if hf_best else None
        for c in COLUMNS:
            r.setdefault(c, None)

    summary = dict(
        workload=asdict(workload),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        transformers=_version("transformers"),
        dtype=dtype,
        tensor_parallel_size=tp,
        model_build_s=model_build_s,
        copy_bandwidth_gbs=bandwidth,
        floor_s=floor.seconds,
        floor_tokens_per_s=floor_tps,
        floor=asdict(floor),
        transformers_best_tokens_per_s=hf_best,
        transformers_note=hf_note,
        rows=rows,
    )
    (out_dir / "benchmark.json").write_text(json.dumps(summary, indent=2, default=str))
    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows])
    with ipc.new_stream(out_dir / "benchmark.arrow", table.schema) as writer:
        writer.write_table(table)
    print(format_table(summary))
    return summary


def format_table(summary: dict) -> str:
    lines = [
        f"workload {summary['workload']['name']} on {summary['device']} ({summary['dtype']}); copy bandwidth "
        f"{summary['copy_bandwidth_gbs']:.0f} GB/s; floor {summary['floor_s']:.2f} s "
        f"({summary['floor_tokens_per_s']:.0f} tok/s)",
        f"{'system':34s} {'reqs':>5s} {'wall s':>8s} {'tok/s':>9s} {'busy':>7s} {'floor':>6s} {'vs tf':>6s}  note",
    ]
    for r in summary["rows"]:
        busy = f"{r['gpu_busy']:.1%}" if r["gpu_busy"] is not None else "-"
        speed = f"{r['speedup_vs_transformers']:.2f}x" if r["speedup_vs_transformers"] else "-"
        lines.append(
            f"{r['system']:34s} {r['requests']:5d} {r['wall_s']:8.2f} {r['tokens_per_s']:9.1f} {busy:>7s} "
            f"{r['fraction_of_floor']:6.1%} {speed:>6s}  {r['note'] or ''}"
        )
    if summary.get("transformers_note"):
        lines.append(summary["transformers_note"])
    return "\n".join(lines)


def _single_gpu_model(workload: Workload, dtype: str, device: torch.device):
    """transformers' model on one device (the tensor-parallel engine's per-parameter weights), or
    (None, why) when the whole model does not fit one GPU."""
    if device.type == "cuda":
        whole = weight_bytes(workload.meta_model(getattr(torch, dtype)))
        total = torch.cuda.get_device_properties(device).total_memory
        if whole > HF_MEMORY_SHARE * total:
            return None, (
                f"transformers skipped: the model's {whole / 1e9:.0f} GB of weights do not fit one "
                f"{total / 1e9:.0f} GB GPU"
            )
    return build_random_model(workload.model_config(), dtype, device, seed=0, init="per_parameter"), None


def _write_steps(path: Path, records) -> None:
    table = pa.Table.from_pylist([r.to_dict() for r in records]) if records else pa.table({})
    with ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)

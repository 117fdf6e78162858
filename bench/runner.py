"""The benchmark: our engine (async and sync) and transformers' continuous batching on one workload, in one process.

It measures the device's copy bandwidth and matmul rate, computes the workload's roofline (the
larger of its bytes at the copy bandwidth and its FLOPs at the matmul rate, ``bench/floor.py``),
and writes one table (printed, and as JSON and Arrow) with wall time, generated tokens/s, GPU
busy, fraction of the roofline and its bound, and the speed-up over transformers' best
configuration measured in the same run.

Like for like: transformers runs the first ``transformers_max_requests`` requests (all by default),
each with its own new-token count (capped at ``transformers_max_new_tokens`` when set), at most
``min(max_num_seqs, that many)`` requests per batch. Our engine runs the whole workload (the
``workload`` rows) and, when that differs, exactly transformers' requests at the same concurrency
(the ``transformers' requests`` row, in the first engine mode). The speed-up column is filled only
on the rows of transformers' requests; each row's roofline is that of the requests it ran. Set-up
is excluded on both sides (``bench/transformers_baseline.py`` says what is timed).

With ``tensor_parallel_size`` N > 1 our engine runs over GPUs 0..N-1 (each rank builds its own
shard; the roofline is then per GPU: its shard of the weights, its heads' KV and attention, at one
GPU's rates). transformers runs afterwards on GPU 0 with the same per-parameter weights, or is
skipped with a note when the whole model does not fit one GPU.
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

from bench.floor import (
    measure_copy_bandwidth,
    measure_matmul_rate,
    weight_bytes,
    workload_floor,
    workload_roofline,
)
from bench.transformers_baseline import CONFIGS, run_transformers
from bench.workloads import Workload, check_fits, run_engine
from engine import build_random_model
from jobs.reporting.report_file import write_report

HF_MEMORY_SHARE = 0.8
"""transformers runs only when the whole model takes at most this share of one GPU's memory."""

WORKLOAD_SET = "workload"
HF_SET = "transformers' requests"
"""``request_set`` of a row: the whole workload, or exactly the requests transformers ran."""

COLUMNS = [
    "system",
    "request_set",
    "requests",
    "wall_s",
    "generated_tokens",
    "tokens_per_s",
    "gpu_busy",
    "fraction_of_roofline",
    "bound",
    "fraction_of_floor",
    "speedup_vs_transformers",
    "startup_s",
    "capture_s",
    "peak_memory_gb",
    "note",
]


def transformers_requests(
    requests: list[tuple[list[int], int]], max_requests: int | None, max_new_tokens: int | None
) -> list[tuple[list[int], int]]:
    """The requests transformers runs: the first ``max_requests``, new tokens capped at ``max_new_tokens``."""
    chosen = requests[:max_requests] if max_requests else requests
    return [(p, min(n, max_new_tokens) if max_new_tokens else n) for p, n in chosen]


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
    tflops, matmul_note = measure_matmul_rate(device)
    shard = model if tp == 1 else workload.meta_model(getattr(torch, dtype), tp)

    def bounds(reqs, seqs):
        return (
            workload_roofline(shard, reqs, seqs, bandwidth, tflops, kv_split=tp),
            workload_floor(shard, reqs, seqs, bandwidth, kv_split=tp),
        )

    hf_reqs = transformers_requests(requests, transformers_max_requests, transformers_max_new_tokens)
    concurrency = min(max_seqs, len(hf_reqs))
    same = hf_reqs == requests and concurrency == max_seqs
    sets = {
        WORKLOAD_SET: dict(requests=requests, max_num_seqs=max_seqs),
        HF_SET: dict(requests=hf_reqs, max_num_seqs=concurrency),
    }
    for s in sets.values():
        s["roofline"], s["floor"] = bounds(s["requests"], s["max_num_seqs"])
        s["generated_tokens"] = sum(n for _, n in s["requests"])
        s["roofline_tokens_per_s"] = s["generated_tokens"] / s["roofline"].seconds
        s["floor_tokens_per_s"] = s["generated_tokens"] / s["floor"].seconds
    roofline, floor = sets[WORKLOAD_SET]["roofline"], sets[WORKLOAD_SET]["floor"]

    labels = [(label, fields) for label, fields in CONFIGS if transformers is None or label in transformers]
    hf_note = None if labels else "transformers not run (bench.transformers is empty)"
    if labels and model is None:
        hf_note = _transformers_skip_reason(workload, dtype, device)

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
        rows.append(_engine_row(f"engine {mode}{suffix}", WORKLOAD_SET, len(requests), r, tp))
    hf_runs = bool(labels) and hf_note is None
    if hf_runs and not same and modes:
        # Our engine on exactly transformers' requests, at its concurrency: the like-for-like pair.
        mode = modes[0]
        r = run_engine(
            workload,
            model,
            mode,
            tensor_parallel_size=tp,
            dtype=dtype,
            requests=hf_reqs,
            max_num_seqs=concurrency,
        )
        rows.append(
            _engine_row(f"engine {mode}{suffix}, transformers' requests", HF_SET, len(hf_reqs), r, tp)
        )

    if hf_runs and model is None:
        model, hf_note = _single_gpu_model(workload, dtype, device)
    # Untimed: transformers' requests' shape and count (other prompts), at most 16 new tokens each.
    warmup = [(p, min(n, 16)) for p, n in workload.requests(count=len(hf_reqs), seed=workload.seed + 1)]
    for label, fields in labels if hf_runs and model is not None else []:
        b = run_transformers(model, hf_reqs, label, fields, concurrency, warmup)
        rows.append(
            dict(
                system=label,
                request_set=HF_SET,
                requests=len(hf_reqs),
                wall_s=b.wall_s,
                generated_tokens=b.generated_tokens,
                tokens_per_s=b.tokens_per_s,
                note=b.error or b.settings,
            )
        )

    tf_rows = [r for r in rows if _is_transformers(r)]
    hf_best = max((r["tokens_per_s"] for r in tf_rows), default=0.0)
    compared_set = WORKLOAD_SET if same else HF_SET
    for r in rows:
        s = sets[r["request_set"]]
        r["fraction_of_roofline"] = r["tokens_per_s"] / s["roofline_tokens_per_s"]
        r["bound"] = s["roofline"].bound
        r["fraction_of_floor"] = r["tokens_per_s"] / s["floor_tokens_per_s"]
        compared = hf_best and (r["request_set"] == compared_set or _is_transformers(r))
        r["speedup_vs_transformers"] = r["tokens_per_s"] / hf_best if compared else None
        for c in COLUMNS:
            r.setdefault(c, None)
    best_label = max(tf_rows, key=lambda r: r["tokens_per_s"])["system"] if hf_best else None
    hf = sets[HF_SET]
    comparison = dict(
        request_set=compared_set,
        requests=len(hf_reqs),
        first_requests=transformers_max_requests,
        max_new_tokens_cap=transformers_max_new_tokens,
        generated_tokens=hf["generated_tokens"],
        concurrency=concurrency,
        same_as_workload=same,
        roofline=hf["roofline"].to_dict(),
        roofline_tokens_per_s=hf["roofline_tokens_per_s"],
        engine_systems=[
            r["system"] for r in rows if r["request_set"] == compared_set and not _is_transformers(r)
        ],
        transformers_best_system=best_label,
        note=_comparison_note(len(requests), len(hf_reqs), transformers_max_new_tokens, concurrency, same)
        if hf_best
        else None,
    )

    summary = dict(
        workload=asdict(workload),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        transformers=_version("transformers"),
        dtype=dtype,
        tensor_parallel_size=tp,
        model_build_s=model_build_s,
        copy_bandwidth_gbs=bandwidth,
        matmul_tflops=tflops,
        matmul_note=matmul_note,
        roofline_s=roofline.seconds,
        roofline_tokens_per_s=sets[WORKLOAD_SET]["roofline_tokens_per_s"],
        roofline_bound=roofline.bound,
        roofline=roofline.to_dict(),
        floor_s=floor.seconds,
        floor_tokens_per_s=sets[WORKLOAD_SET]["floor_tokens_per_s"],
        floor=asdict(floor),
        comparison=comparison,
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


def _is_transformers(row: dict) -> bool:
    return row["system"].startswith("transformers")


def _engine_row(system: str, request_set: str, count: int, r, tp: int) -> dict:
    return dict(
        system=system,
        request_set=request_set,
        requests=count,
        wall_s=r.wall_s,
        generated_tokens=r.generated_tokens,
        tokens_per_s=r.tokens_per_s,
        gpu_busy=r.gpu_busy,
        startup_s=r.startup_s,
        capture_s=r.capture_s,
        peak_memory_gb=r.peak_memory_gb,
        note=f"{r.steps} steps, CPU prep {r.mean_prep_ms:.2f} ms/step, "
        f"GPU compute {r.mean_compute_ms:.2f} ms/step"
        + (f", tensor parallel over {tp} GPUs (start-up includes the ranks' model build)" if tp > 1 else ""),
    )


def _comparison_note(total: int, count: int, cap: int | None, concurrency: int, same: bool) -> str:
    which = "all requests" if count == total else f"the first {count} requests"
    tokens = f"new tokens capped at {cap}" if cap else "their own new-token counts"
    rows = "the workload rows" if same else "the rows on transformers' requests"
    return (
        f"vs tf: {rows} ({which}, {tokens}, at most {concurrency} concurrent on both sides) "
        f"against transformers' best on the same requests"
    )


def format_table(summary: dict) -> str:
    def roof(r: dict) -> str:
        return (
            f"{r['seconds']:.3g} s, {r['bound']}-bound (bytes {r['bytes'] / 1e9:.4g} GB -> {r['memory_s']:.3g} s, "
            f"FLOPs {r['flops'] / 1e12:.4g} T -> {r['compute_s']:.3g} s)"
        )

    cmp = summary["comparison"]
    lines = [
        f"workload {summary['workload']['name']} on {summary['device']} ({summary['dtype']}); copy bandwidth "
        f"{summary['copy_bandwidth_gbs']:.0f} GB/s; matmul {summary['matmul_tflops']:.3g} TFLOP/s "
        f"({summary['matmul_note']})",
        f"roofline of the workload: {roof(summary['roofline'])} = {summary['roofline_tokens_per_s']:.0f} tok/s",
    ]
    if not cmp["same_as_workload"] and any(r["request_set"] == HF_SET for r in summary["rows"]):
        lines.append(
            f"roofline of transformers' requests ({cmp['requests']} requests, at most {cmp['concurrency']} "
            f"concurrent): {roof(cmp['roofline'])} = {cmp['roofline_tokens_per_s']:.0f} tok/s"
        )
    lines.append(
        f"{'system':46s} {'reqs':>5s} {'wall s':>8s} {'tok/s':>9s} {'busy':>7s} {'roofl.':>6s} {'bound':>9s} "
        f"{'vs tf':>6s}  note"
    )
    for r in summary["rows"]:
        busy = f"{r['gpu_busy']:.1%}" if r["gpu_busy"] is not None else "-"
        speed = f"{r['speedup_vs_transformers']:.2f}x" if r["speedup_vs_transformers"] else "-"
        lines.append(
            f"{r['system']:46s} {r['requests']:5d} {r['wall_s']:8.2f} {r['tokens_per_s']:9.1f} {busy:>7s} "
            f"{r['fraction_of_roofline']:6.1%} {r['bound']:>9s} {speed:>6s}  {r['note'] or ''}"
        )
    if cmp.get("note"):
        lines.append(cmp["note"])
    if summary.get("transformers_note"):
        lines.append(summary["transformers_note"])
    return "\n".join(lines)


def _transformers_skip_reason(workload: Workload, dtype: str, device: torch.device) -> str | None:
    """Why transformers cannot run the whole model on one GPU, or None when it can."""
    if device.type == "cuda":
        whole = weight_bytes(workload.meta_model(getattr(torch, dtype)))
        total = torch.cuda.get_device_properties(device).total_memory
        if whole > HF_MEMORY_SHARE * total:
            return (
                f"transformers skipped: the model's {whole / 1e9:.0f} GB of weights do not fit one "
                f"{total / 1e9:.0f} GB GPU"
            )
    return None


def _single_gpu_model(workload: Workload, dtype: str, device: torch.device):
    """transformers' model on one device (the tensor-parallel engine's per-parameter weights), or
    (None, why) when the whole model does not fit one GPU."""
    why = _transformers_skip_reason(workload, dtype, device)
    if why is not None:
        return None, why
    return build_random_model(workload.model_config(), dtype, device, seed=0, init="per_parameter"), None


def _write_steps(path: Path, records) -> None:
    table = pa.Table.from_pylist([r.to_dict() for r in records]) if records else pa.table({})
    with ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)

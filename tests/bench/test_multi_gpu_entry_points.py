"""The multi-GPU benchmark entry points, run on CPU in reduced form so their code paths stay exercised:
``python -m bench.workloads <w> --tp N``, the benchmark with tensor parallelism, and python -m bench.scripts.dp_scaling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import runner as bench_runner
from bench.runner import run_benchmark
from bench.workloads import WORKLOADS, cli

ROOT = Path(__file__).resolve().parents[2]
SMOKE = WORKLOADS["smoke"]
SMOKE_TOKENS = sum(n for _, n in SMOKE.requests())


def test_workloads_cli_runs_a_workload_tensor_parallel(capsys):
    (result,) = cli(["smoke", "--tp", "2", "--modes", "sync"])
    assert result.mode == "sync" and result.generated_tokens == SMOKE_TOKENS
    assert "smoke tp2 sync  wall" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["smoke", "--modes", "fast"])


def test_benchmark_with_tensor_parallelism(tmp_path):
    summary = run_benchmark(
        SMOKE, tmp_path, modes=("async",), transformers=(), tensor_parallel_size=2, report=False
    )
    (row,) = summary["rows"]
    assert row["system"] == "engine async (TP=2)" and row["generated_tokens"] == SMOKE_TOKENS
    assert summary["tensor_parallel_size"] == 2 and summary["transformers_note"]
    # The floor of one rank: its shard of the weights, half the KV heads.
    whole = sum(p.numel() * 4 for p in SMOKE.meta_model(torch.float32).parameters())
    assert summary["floor"]["weight_bytes"] < whole
    assert summary["roofline"]["weight_bytes"] < summary["roofline"]["steps"] * whole
    assert (
        summary["comparison"]["transformers_best_system"] is None and row["speedup_vs_transformers"] is None
    )
    assert (tmp_path / "steps_async.arrow").exists()
    json.loads((tmp_path / "benchmark.json").read_text())


def test_transformers_runs_the_tensor_parallel_weights_on_one_device_or_is_skipped(monkeypatch):
    model, note = bench_runner._single_gpu_model(SMOKE, "float32", torch.device("cpu"))
    assert (
        note is None and model.model.layers[0].mlp.up_proj.weight.shape[0] == SMOKE.model["intermediate_size"]
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 10**5}))
    model, note = bench_runner._single_gpu_model(SMOKE, "float32", torch.device("cuda"))
    assert model is None and note.startswith("transformers skipped: the model's")


def test_w70b_is_llama3_70b_shaped():
    w = WORKLOADS["w70b"]
    meta = w.meta_model(torch.bfloat16)
    assert 140e9 < sum(p.numel() * 2 for p in meta.parameters()) < 142e9
    assert w.num_requests == 64 and w.prompt_len == (256, 256) and w.new_tokens == (256, 256)
    shard = w.meta_model(torch.bfloat16, 8)
    assert shard.model.layers[0].self_attn.k_proj.weight.shape[0] == 128  # one KV head of 8 per rank


def test_dp_scaling_smoke_runs_one_then_two_engines():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scripts.dp_scaling", "--smoke"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"smoke sync on 1 CPU process(es): {SMOKE_TOKENS} tokens")
    assert lines[1].startswith(f"smoke sync on 2 CPU process(es): {SMOKE_TOKENS} tokens")
    assert lines[2].startswith("scaling: ") and lines[2].endswith("with 2 engines (ideal 2x)")

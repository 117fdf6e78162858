"""`python run.py job=benchmark bench=smoke` produces one consistent table (a test of the job, not of speed)."""

import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from bench.workloads import WORKLOADS


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, preloaded_cli):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    proc = preloaded_cli.run(["job=benchmark", "bench=smoke", f"run_dir={out}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


SYSTEMS = ["engine async", "engine sync", "engine async, transformers' requests", "transformers sync"]


def test_benchmark_prints_and_writes_one_table(smoke_run):
    out, proc = smoke_run
    summary = json.loads((out / "benchmark.json").read_text())
    systems = [r["system"] for r in summary["rows"]]
    assert systems == SYSTEMS
    for system in systems:
        assert system in proc.stdout
    assert "roofline of the workload:" in proc.stdout and "roofline of transformers' requests" in proc.stdout
    assert "matmul" in proc.stdout and "float32 1024x1024x1024 matmul on cpu" in proc.stdout
    assert (
        "vs tf: the rows on transformers' requests (all requests, new tokens capped at 16, at most 8 "
        in proc.stdout
    )
    with ipc.open_stream(out / "benchmark.arrow") as reader:
        table = reader.read_all()
    assert table.column("system").to_pylist() == systems
    assert table.column("tokens_per_s").to_pylist() == pytest.approx(
        [r["tokens_per_s"] for r in summary["rows"]]
    )
    assert table.column("fraction_of_roofline").to_pylist() == pytest.approx(
        [r["fraction_of_roofline"] for r in summary["rows"]]
    )
    assert table.column("bound").to_pylist() == [r["bound"] for r in summary["rows"]]


def test_benchmark_numbers_are_consistent(smoke_run):
    out, _ = smoke_run
    summary = json.loads((out / "benchmark.json").read_text())
    workload = WORKLOADS["smoke"]
    requests = workload.requests()
    expected_tokens = sum(n for _, n in requests)
    hf_tokens = sum(
        min(n, 16) for _, n in requests
    )  # bench=smoke caps transformers' requests at 16 new tokens
    assert summary["copy_bandwidth_gbs"] > 0 and summary["matmul_tflops"] > 0
    assert summary["floor_s"] > 0 and summary["roofline_s"] > 0
    roof = summary["roofline"]
    assert roof["seconds"] == pytest.approx(max(roof["memory_s"], roof["compute_s"]))
    assert roof["memory_s"] == pytest.approx(roof["bytes"] / (summary["copy_bandwidth_gbs"] * 1e9))
    assert roof["compute_s"] == pytest.approx(roof["flops"] / (summary["matmul_tflops"] * 1e12))
    assert summary["roofline_bound"] == roof["bound"] in ("bandwidth", "compute")
    assert summary["roofline_tokens_per_s"] == pytest.approx(expected_tokens / summary["roofline_s"])
    cmp = summary["comparison"]
    assert (cmp["requests"], cmp["concurrency"], cmp["generated_tokens"]) == (len(requests), 8, hf_tokens)
    assert cmp["engine_systems"] == ["engine async, transformers' requests"]
    assert cmp["transformers_best_system"] == "transformers sync"
    roof_tps = {
        "workload": summary["roofline_tokens_per_s"],
        "transformers' requests": cmp["roofline_tokens_per_s"],
    }
    best = summary["transformers_best_tokens_per_s"]
    assert best > 0
    for row in summary["rows"]:
        assert row["tokens_per_s"] == pytest.approx(row["generated_tokens"] / row["wall_s"])
        assert row["fraction_of_roofline"] == pytest.approx(
            row["tokens_per_s"] / roof_tps[row["request_set"]]
        )
        assert row["bound"] in ("bandwidth", "compute")
        if row["request_set"] == "workload":
            assert row["speedup_vs_transformers"] is None  # not the requests transformers ran
            assert row["generated_tokens"] == expected_tokens
        else:
            assert row["speedup_vs_transformers"] == pytest.approx(row["tokens_per_s"] / best)
            assert row["generated_tokens"] == hf_tokens
    engine_rows = [r for r in summary["rows"] if r["system"].startswith("engine")]
    for row in engine_rows:
        assert 0 < row["gpu_busy"] <= 1.0
        assert row["startup_s"] >= 0 and row["capture_s"] >= 0


def test_benchmark_writes_the_step_records_of_each_mode(smoke_run):
    out, _ = smoke_run
    summary = json.loads((out / "benchmark.json").read_text())
    for mode in ("async", "sync"):
        with ipc.open_stream(out / f"steps_{mode}.arrow") as reader:
            steps: pa.Table = reader.read_all()
        (row,) = [r for r in summary["rows"] if r["system"] == f"engine {mode}"]
        assert f"{steps.num_rows} steps" in row["note"]
        assert set(steps.column("mode").to_pylist()) == {mode}
        total = sum(steps.column("decode_tokens").to_pylist()) + sum(
            steps.column("prefill_tokens").to_pylist()
        )
        assert total >= row["generated_tokens"]


def test_benchmark_writes_a_timing_report_for_each_mode(smoke_run):
    out, _ = smoke_run
    for mode in ("async", "sync"):
        report = json.loads((out / f"{mode}_report.json").read_text())
        with ipc.open_stream(out / f"steps_{mode}.arrow") as reader:
            steps = reader.read_all()
        assert report["steps"] == steps.num_rows
        png = out / f"{mode}_timeline.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The timing report: the two-lane timeline rebuilt from step records, its figures, the files and the job."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import report
from jobs.errors import JobError
from jobs.pipeline.progress import RunStats
from jobs.pipeline.writer import write_stream
from jobs.reporting import plots as report_plots
from jobs.reporting import report_file
from jobs.reporting.timeline import build_timeline, busy_per_bin, merge_intervals, read_steps
from jobs_helpers import compose_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def simulate(
    mode: str, n: int, seed: int = 0, t0: float = 1.75e9, attempt: int | None = 1
) -> tuple[list, dict]:
    """Step records of a simulated engine run, and the true GPU intervals and busy fraction.

    Sync: prepare, compute, process the outputs, repeat. Async: prepare step N and launch it (it runs
    once step N-1's compute is done), then wait for step N-1's outputs and process them while N computes.
    """
    rng = random.Random(seed)
    t, prev_end = t0, None
    rows, gpu = [], []
    for i in range(n):
        prep, compute, process = rng.uniform(2e-3, 6e-3), rng.uniform(5e-3, 2e-2), rng.uniform(1e-3, 4e-3)
        cpu_end = t + prep
        gpu_start = cpu_end if prev_end is None else max(cpu_end, prev_end)
        rows.append(
            dict(
                step=i,
                start_time=t,
                cpu_prep_s=prep,
                gpu_compute_s=compute,
                gpu_idle_s=0.0 if prev_end is None else gpu_start - prev_end,
                num_seqs=1 + i % 8,
                prefill_tokens=100 if i % 10 == 0 else 0,
                decode_tokens=i % 8,
                kv_blocks_used=10 + i,
                kv_blocks_total=1000,
                mode=mode,
            )
            | ({} if attempt is None else {"attempt": attempt})
        )
        gpu.append((gpu_start, gpu_start + compute))
        waited = gpu_start + compute if mode == "sync" else max(cpu_end, prev_end or cpu_end)
        prev_end = gpu_start + compute
        t = waited + process
    starts, ends = np.array(gpu).T
    truth = dict(gpu_start=starts - t0, gpu_end=ends - t0, busy=(ends - starts).sum() / (ends[-1] - t0))
    return rows, truth


def write_steps(path: Path, rows: list[dict]) -> Path:
    """Step rows as an Arrow IPC stream file, as the job writer and the benchmark write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_stream(path, pa.Table.from_pylist(rows))
    return path


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_gpu_lane_chain_matches_the_simulated_engine(tmp_path, mode):
    rows, truth = simulate(mode, 200, seed=1)
    tl = build_timeline(read_steps([write_steps(tmp_path / "steps-000001.arrow", rows)]))
    np.testing.assert_allclose(tl.gpu_start, truth["gpu_start"], atol=1e-6)
    np.testing.assert_allclose(tl.gpu_end, truth["gpu_end"], atol=1e-6)
    np.testing.assert_allclose(
        tl.cpu_start, [r["start_time"] - rows[0]["start_time"] for r in rows], atol=1e-6
    )
    s = report_file.write_report([tmp_path / "steps-000001.arrow"], tmp_path, "sim")
    assert s.gpu_busy == pytest.approx(truth["busy"], rel=1e-6)
    assert s.steps == 200 and s.segments == 1 and s.modes == [mode]


def test_async_overlaps_preparation_with_the_previous_compute_and_keeps_the_gpu_busier(tmp_path):
    sync_rows, sync_truth = simulate("sync", 300, seed=2)
    async_rows, async_truth = simulate("async", 300, seed=2)
    s_sync = report_file.write_report(
        [write_steps(tmp_path / "steps_sync.arrow", sync_rows)], tmp_path, "s", "sync_"
    )
    s_async = report_file.write_report(
        [write_steps(tmp_path / "steps_async.arrow", async_rows)], tmp_path, "a", "async_"
    )
    tl = build_timeline(read_steps([tmp_path / "steps_async.arrow"]))
    overlaps = (tl.cpu_start[1:] < tl.gpu_end[:-1]) & (tl.cpu_end[1:] > tl.gpu_start[:-1])
    assert overlaps.mean() > 0.9, "step N+1 is prepared while step N computes"
    assert s_sync.gpu_busy < 0.8 < 0.95 < s_async.gpu_busy
    assert s_async.gpu_busy == pytest.approx(async_truth["busy"], rel=1e-6)
    assert s_sync.gpu_idle_s == pytest.approx(s_sync.wall_s - s_sync.gpu_compute_s)
    for prefix in ("sync_", "async_"):
        for name in ("timeline.png", "batch_kv.png", "report.md", "report.json"):
            assert (tmp_path / (prefix + name)).stat().st_size > 0


def test_summary_figures_equal_the_step_records(tmp_path):
    rows, _ = simulate("sync", 500, seed=3)
    for i, r in enumerate(rows):
        r["preempted"] = int(i % 97 == 5)
    s = report_file.write_report(
        [write_steps(tmp_path / "steps" / "steps-000001.arrow", rows)], tmp_path, "t"
    )
    data = json.loads((tmp_path / "report.json").read_text())
    prep_ms = np.array([r["cpu_prep_s"] for r in rows]) * 1000
    compute_ms = np.array([r["gpu_compute_s"] for r in rows]) * 1000
    assert data["steps"] == 500 and data["preemptions"] == sum(r["preempted"] for r in rows) == 6
    assert data["prefill_tokens"] == sum(r["prefill_tokens"] for r in rows)
    assert data["decode_tokens"] == sum(r["decode_tokens"] for r in rows)
    assert data["gpu_compute_s"] == pytest.approx(compute_ms.sum() / 1000)
    assert data["cpu_prep"]["mean_ms"] == pytest.approx(prep_ms.mean())
    assert data["cpu_prep"]["p99_ms"] == pytest.approx(np.percentile(prep_ms, 99))
    assert data["gpu_step"]["p50_ms"] == pytest.approx(np.median(compute_ms))
    assert data["steps_per_s"] == pytest.approx(500 / data["wall_s"])
    assert data["max_num_seqs"] == 8 and data["kv_peak_fraction"] == pytest.approx(509 / 1000)
    assert data == dataclasses.asdict(s)
    md = (tmp_path / "report.md").read_text()
    assert f"{s.gpu_busy:.1%}" in md and "| preemptions | 6 |" in md and "![timeline.png](timeline.png)" in md


def test_resumed_run_is_laid_out_per_attempt_without_the_time_between(tmp_path):
    first, t1 = simulate("sync", 50, seed=4, attempt=1)
    second, t2 = simulate("sync", 30, seed=5, t0=1.75e9 + 3600, attempt=2)
    files = [write_steps(tmp_path / f"steps-{i:06d}.arrow", rows) for i, rows in ((2, second), (1, first))]
    s = report_file.write_report(files, tmp_path, "resumed")
    span1, span2 = t1["gpu_end"][-1], t2["gpu_end"][-1]
    assert s.segments == 2 and s.steps == 80
    assert s.wall_s == pytest.approx(span1 + span2, rel=1e-6)
    compute = sum(r["gpu_compute_s"] for r in first + second)
    assert s.gpu_busy == pytest.approx(compute / (span1 + span2), rel=1e-6)
    tl = build_timeline(read_steps(files))
    assert tl.segment_starts == pytest.approx([0.0, span1]) and list(tl.cols.values["step"][:3]) == [0, 1, 2]


def test_benchmark_files_without_attempt_or_preemption_columns(tmp_path):
    rows, truth = simulate("async", 60, attempt=None)
    s = report_file.write_report(
        [write_steps(tmp_path / "steps_async.arrow", rows)], tmp_path / "out", "w", "async_"
    )
    assert s.preemptions is None and s.gpu_busy == pytest.approx(truth["busy"], rel=1e-6)
    assert s.files == ["async_timeline.png", "async_batch_kv.png", "async_report.md", "async_report.json"]
    assert "unavailable" in (tmp_path / "out" / "async_report.md").read_text()


def test_summary_is_written_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(report_plots, "available", lambda: False)
    rows, truth = simulate("sync", 40)
    s = report_file.write_report([write_steps(tmp_path / "steps.arrow", rows)], tmp_path, "no plots")
    assert sorted(p.name for p in tmp_path.glob("report.*")) == ["report.json", "report.md"]
    assert not list(tmp_path.glob("*.png")) and s.files == ["report.md", "report.json"]
    assert json.loads((tmp_path / "report.json").read_text())["gpu_busy"] == pytest.approx(
        truth["busy"], rel=1e-6
    )


@pytest.mark.parametrize("mode,label", [("sync", "device busy"), ("async", "GPU busy")])
def test_busy_is_called_a_gpus_only_for_async_steps(tmp_path, monkeypatch, mode, label):
    """Async mode runs only on CUDA; sync steps may be a CPU's (the records do not name the device)."""
    monkeypatch.setattr(report_plots, "available", lambda: False)
    rows, _ = simulate(mode, 20)
    s = report_file.write_report([write_steps(tmp_path / "steps.arrow", rows)], tmp_path, "t")
    assert s.busy_label == label and f"| {label} | {s.gpu_busy:.1%} |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "device,label", [("cpu", "device busy"), (None, "device busy"), ("cuda", "GPU busy")]
)
def test_the_run_summary_says_gpu_busy_only_on_cuda(device, label):
    line = RunStats(source_rows=2, gpu_busy=0.988, device=device).summary()
    assert line.endswith(f"| {label} 98.8%") and ("GPU busy" in line) == (device == "cuda")


def test_no_step_records_or_other_files_are_refused(tmp_path):
    write_stream(tmp_path / "empty.arrow", pa.table({}))
    with pytest.raises(JobError, match="no step records"):
        report_file.write_report([tmp_path / "empty.arrow"], tmp_path, "x")
    write_stream(tmp_path / "rows.arrow", pa.table({"id": ["a"]}))
    with pytest.raises(JobError, match="missing columns"):
        report_file.write_report([tmp_path / "rows.arrow"], tmp_path, "x")
    rows, _ = simulate("sync", 5)
    with pytest.raises(JobError, match="zoom_steps"):
        report_file.write_report([write_steps(tmp_path / "steps.arrow", rows)], tmp_path, "x", zoom_steps=0)
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(JobError, match="cannot read"):
        report_file.write_report([tmp_path / "junk.arrow"], tmp_path, "x")


def test_zoomed_window_covers_the_middle_of_the_longest_engine_run(tmp_path):
    rows, _ = simulate("sync", 300)
    tl = build_timeline(read_steps([write_steps(tmp_path / "s.arrow", rows)]))
    assert report_plots.zoom_window(tl, 40) == slice(130, 170)
    short, _ = simulate("sync", 10)
    assert report_plots.zoom_window(
        build_timeline(read_steps([write_steps(tmp_path / "t.arrow", short)])), 40
    ) == slice(0, 10)


def test_merge_intervals_joins_overlaps_and_gaps_below_the_limit():
    start, end = np.array([0.0, 1.0, 1.5, 4.0, 4.05]), np.array([1.0, 2.0, 1.8, 4.0, 5.0])
    s, e = merge_intervals(start, end, 0.1)
    assert s.tolist() == [0.0, 4.0] and e.tolist() == [2.0, 5.0]
    s, e = merge_intervals(start, end)
    assert s.tolist() == [0.0, 4.0, 4.05] and e.tolist() == [2.0, 4.0, 5.0]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("examples")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.5), st.booleans()), min_size=1, max_size=60
    ),
    st.integers(1, 50),
)
def test_gpu_lane_never_overlaps_and_busy_bins_add_up_to_the_compute(scratch, steps, bins):
    t, rows = 100.0, []
    for i, (prep, compute, idle, waits) in enumerate(steps):
        rows.append(
            dict(step=i, start_time=t, cpu_prep_s=prep, gpu_compute_s=compute, gpu_idle_s=idle if i else 0.0)
            | dict(
                num_seqs=1, prefill_tokens=0, decode_tokens=1, kv_blocks_used=1, kv_blocks_total=2, mode="x"
            )
        )
        t += prep + (idle if waits else 0.0)
    tl = build_timeline(read_steps([write_steps(scratch / "steps.arrow", rows)]))
    assert np.all(tl.gpu_start[1:] >= tl.gpu_end[:-1] - 1e-9) and np.all(tl.gpu_start >= tl.cpu_end[0] - 1e-9)
    compute = sum(r["gpu_compute_s"] for r in rows)
    assert 0 <= compute <= tl.wall_s + 1e-9
    edges = np.linspace(0, max(tl.wall_s, 1e-6), bins + 1)
    covered = busy_per_bin(tl.gpu_start, tl.gpu_end, edges) * np.diff(edges)
    assert covered.sum() == pytest.approx(compute, abs=1e-6)
    assert np.all(covered <= np.diff(edges) + 1e-9)


def test_report_job_config():
    cfg = compose_config(["job=report", "run_dir=/runs/x"])
    assert cfg.job.name == "report" and cfg.job.zoom_steps == 40 and cfg.run_dir == "/runs/x"


def test_report_job_writes_each_shard_folder_and_refuses_a_folder_without_steps(tmp_path):
    for i in range(2):
        write_steps(
            tmp_path / f"shard-{i:05d}-of-00002" / "steps" / "steps-000001.arrow", simulate("sync", 20, i)[0]
        )
    summaries = report.run(compose_config(["job=report", f"run_dir={tmp_path}"]))
    assert [s.title for s in summaries] == [f"{tmp_path.name}/shard-{i:05d}-of-00002" for i in range(2)]
    for i in range(2):
        assert (tmp_path / f"shard-{i:05d}-of-00002" / "timeline.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(JobError, match="no step records"):
        report.run(compose_config(["job=report", f"run_dir={tmp_path / 'nothing'}"]))

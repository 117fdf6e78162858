"""The report of a real run: the embedded default job on CPU, reported through the CLI and in process."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pyarrow as pa
import pytest
import torch

from jobs.generate import run_generation
from jobs.pipeline.manifest import read_stream
from jobs.report import step_files
from jobs.reporting.report_file import write_report
from jobs_helpers import compose_config, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_default(tmp_path_factory):
    """Run the embedded default job (tiny model, shipped prompts) with extra overrides; return its run dir."""
    root = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model runs fastest on one thread

    def run(*overrides: str) -> Path:
        cfg = compose_config(
            [
                "job=synthetic_data",
                f"output_root={root}",
                f"models_dir={root / '_models'}",
                "runner.progress=false",
            ]
            + list(overrides)
        )
        run_generation(cfg)
        return Path(cfg.run_dir)

    yield run
    torch.set_num_threads(before)


def expected_figures(run_dir: Path) -> dict:
    """The report's figures computed here from the step records: one engine run, GPU lane chained from the first step.

    Sums over absolute wall-clock times (about 1.8e9 s) keep about 1e-7 s of precision, hence the tolerance below.
    """
    rows = pa.concat_tables([read_stream(p) for p in step_files(run_dir)]).to_pylist()
    assert [r["step"] for r in rows] == list(range(len(rows)))
    first = rows[0]
    compute = sum(r["gpu_compute_s"] for r in rows)
    gpu_end = (
        first["start_time"] + first["cpu_prep_s"] + sum(r["gpu_idle_s"] + r["gpu_compute_s"] for r in rows)
    )
    cpu_end = max(r["start_time"] + r["cpu_prep_s"] for r in rows)
    wall = max(gpu_end, cpu_end) - first["start_time"]
    return dict(
        steps=len(rows),
        gpu_compute_s=compute,
        wall_s=wall,
        gpu_busy=compute / wall,
        prefill_tokens=sum(r["prefill_tokens"] for r in rows),
        decode_tokens=sum(r["decode_tokens"] for r in rows),
        preemptions=sum(r["preempted"] for r in rows) if "preempted" in rows[0] else None,
        max_num_seqs=max(r["num_seqs"] for r in rows),
        modes=sorted({r["mode"] for r in rows}),
    )


def assert_matches(report: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert report[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    assert 0 < report["gpu_busy"] <= 1 and report["segments"] == 1


def assert_pngs(folder: Path, prefix: str = "") -> None:
    """The timeline (three panels) and batch/KV (two panels) plots are complete PNG images."""
    for name, shape in (("timeline.png", (900, 1300)), ("batch_kv.png", (700, 1300))):
        data = (folder / (prefix + name)).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert matplotlib.image.imread(folder / (prefix + name)).shape[:2] == shape, name


def test_report_job_on_the_embedded_default_matches_its_step_records(run_default):
    run_dir = run_default()
    proc = run_cli(["job=report", f"run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr
    assert "device busy" in proc.stderr and "GPU busy" not in proc.stderr, "a sync (CPU) run"
    assert "report.json" in proc.stderr
    report = json.loads((run_dir / "report.json").read_text())
    expected = expected_figures(run_dir)
    assert_matches(report, expected)
    assert expected["decode_tokens"] + expected["prefill_tokens"] > 100 * 48 and report["modes"] == ["sync"]
    assert_pngs(run_dir)
    md = (run_dir / "report.md").read_text()
    assert f"| device busy | {report['gpu_busy']:.1%} |" in md and f"| steps | {expected['steps']:,} " in md


def test_report_of_an_async_run_in_process(run_default):
    run_dir = run_default("engine.mode=async", "data.limit=12", "run_name=async")
    summary = write_report(step_files(run_dir), run_dir / "report", "async run", prefix="async_")
    assert_matches(
        json.loads((run_dir / "report" / "async_report.json").read_text()), expected_figures(run_dir)
    )
    assert summary.modes == ["async"] and summary.files[0] == "async_timeline.png"
    assert_pngs(run_dir / "report", "async_")

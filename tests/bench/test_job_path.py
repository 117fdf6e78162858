"""``bench=job``: the real synthetic_data job against the engine alone on the same requests (CPU, tiny shape)."""

import json
from pathlib import Path

from jobs_helpers import ROOT, read_rows

SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "qwen2-tokenizer"


def test_job_path_benchmark_runs_both_sides_on_the_same_requests(tmp_path, models_dir, preloaded_cli):
    # The real Qwen2 tokenizer where the checkout has it beside it, else the shipped tiny one.
    tokenizer = SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else ROOT / "jobs" / "assets" / "tiny-chat"
    out = tmp_path / "job-bench"
    proc = preloaded_cli.run(
        [
            "job=benchmark",
            "bench=job",
            "bench.job_model=tiny",
            "bench.num_prompts=10",
            "bench.max_new_tokens=5",
            f"bench.tokenizer_dir={tokenizer}",
            f"run_dir={out}",
            f"models_dir={models_dir}",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "benchmark.json").read_text())
    assert result["requests"] == 10
    assert result["job"]["generated_tokens"] == result["engine_alone"]["generated_tokens"] == 50
    assert result["sampling"]["temperature"] == 0.8 and result["sampling"]["ignore_eos"]
    assert result["job_vs_engine"] > 0
    rows = read_rows(Path(out) / "job")
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(10))
    assert "| job (synthetic_data) | 10 | 50 |" in proc.stdout and "device busy" in proc.stdout

"""``bench.scripts.lm_eval_compare --tiny``: both backends on the same local task agree (CPU, float32)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate")

from bench.scripts import lm_eval_compare  # noqa: E402


def test_tiny_comparison_agrees_sample_for_sample(tmp_path, monkeypatch, capsys):
    import lm_eval.evaluator

    # lm-eval's environment report (a few seconds of subprocesses per call) is not what is tested here.
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = lm_eval_compare.main(
            ["--tiny", "--samples", "6", "--warmup-samples", "2", "--work-dir", str(tmp_path),
             "--batchgen-args", "max_batch_tokens=256,block_size=8"]
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    ours, theirs = result["runs"]
    assert (ours["backend"], theirs["backend"]) == ("batchgen", "hf")
    assert ours["samples"] == theirs["samples"] == 6 and ours["requests"] == 24
    assert result["agreement"]["answer_agreement"] == 1.0 and result["agreement"]["acc_equal"]
    assert result["agreement"]["max_abs_loglikelihood_diff"] < 1e-3
    assert ours["acc_norm"] == theirs["acc_norm"]
    assert json.loads((tmp_path / "result.json").read_text())["agreement"] == result["agreement"]
    rows = [
        json.loads(line) for line in (tmp_path / "tasks" / "bg_compare_mc.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 6 and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
    out = capsys.readouterr().out
    assert "| batchgen | 6 | 24 |" in out and "| hf | 6 | 24 |" in out and "answer agreement 1.0000" in out


def test_one_backend_alone(tmp_path, monkeypatch):
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    result = lm_eval_compare.main(
        ["--tiny", "--samples", "3", "--warmup-samples", "1", "--work-dir", str(tmp_path), "--backends", "hf"]
    )
    assert [r["backend"] for r in result["runs"]] == ["hf"] and result["agreement"] is None


def test_synthetic_questions_are_deterministic_with_distinct_answers():
    import random

    a = [lm_eval_compare.question(random.Random(3), 4) for _ in range(1)]
    b = [lm_eval_compare.question(random.Random(3), 4) for _ in range(1)]
    assert a == b
    rng = random.Random(0)
    qs = [lm_eval_compare.question(rng, 4) for _ in range(200)]
    assert all(len(set(q["choices"])) == 4 for q in qs)
    words = [len(q["context"].split()) for q in qs]
    assert min(words) >= 10 and max(words) <= 230 and max(words) > 150

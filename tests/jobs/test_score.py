"""job=score end to end on the built-in tiny model: values against transformers, error rows, resume after SIGKILL."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import tiny_model
from jobs.generate import output_dir
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs.pipeline.scoring import SCORE_SCHEMA
from jobs.score import run as run_score
from jobs_helpers import ROOT, compose_config, read_rows, rows_by_custom_id, write_jsonl

CHOICES = ROOT / "jobs" / "assets" / "choices.jsonl"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(models_dir):
    """The built-in model on transformers' eager attention, and its tokenizer."""
    path = tiny_model.materialise("tiny_chat", models_dir)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.inference_mode()
def expected_score(model, ids: list[int], n: int) -> tuple[float, bool, list[float]]:
    """Sum of the logprobs of the last ``n`` tokens of ``ids``, whether each is the argmax, and each logprob."""
    lsm = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)[:-1]
    targets = torch.tensor(ids[1:])
    lps = lsm.gather(1, targets[:, None]).squeeze(1)[-n:]
    greedy = bool((lsm.argmax(-1)[-n:] == targets[-n:]).all())
    return float(lps.sum()), greedy, lps.tolist()


def overrides(root, models_dir, *extra):
    return [
        "job=score",
        f"output_root={root}",
        f"models_dir={models_dir}",
        "runner.progress=false",
        "engine.max_batch_tokens=24",  # chunked prefill of the longer rows
        "engine.block_size=4",  # and shared context blocks between a row's continuations
        *extra,
    ]


def test_score_job_matches_transformers_and_writes_error_rows(tmp_path, models_dir, reference):
    model, tok = reference
    lines = [json.loads(line) for line in CHOICES.read_text().splitlines()][:8]
    lines[1]["continuations"] = " only one, as a text"
    bad = [
        {"id": "null", "context": "Hello", "continuations": None},
        {"id": "empty", "context": "Hello", "continuations": []},
        {"id": "number", "context": "Hello", "continuations": [" fine", 3]},
        {"id": "no-context", "context": None, "continuations": [" x"]},
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", lines + bad)
    cfg = compose_config(overrides(tmp_path, models_dir, f"data.path={src}", "job.top_logprobs=2"))
    stats = run_score(cfg)
    assert stats.complete and stats.error_rows == 4
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    assert set(rows) == {
        f"{r['id']}-{i}"
        for r in lines
        for i in range(len(r["continuations"]) if isinstance(r["continuations"], list) else 1)
    } | {f"{b['id']}-0" for b in bad}
    for line in lines:
        conts = line["continuations"] if isinstance(line["continuations"], list) else [line["continuations"]]
        ctx = tok.encode(line["context"], add_special_tokens=True)
        for i, cont in enumerate(conts):
            row = rows[f"{line['id']}-{i}"]
            cont_ids = tok.encode(cont, add_special_tokens=False)
            total, greedy, lps = expected_score(model, ctx + cont_ids, len(cont_ids))
            assert row["error"] is None and row["continuation"] == cont and row["prompt"] == line["context"]
            assert row["num_tokens"] == len(cont_ids) and row["token_ids"] == cont_ids
            assert row["context_tokens"] == len(ctx)
            assert row["logprob"] == pytest.approx(total, abs=1e-4)
            assert row["token_logprobs"] == pytest.approx(lps, abs=1e-4)
            assert row["is_greedy"] == greedy
            assert len(row["top_logprobs"]) == len(cont_ids) and all(len(t) == 2 for t in row["top_logprobs"])
    for b in bad:
        row = rows[f"{b['id']}-0"]
        assert row["error"] and row["logprob"] is None
    assert "must be a non-empty text" in rows["number-0"]["error"]


def test_score_job_text_form_scores_every_token_after_the_first(tmp_path, models_dir, reference):
    model, tok = reference
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello", "A" * 70, "x"]
    src = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    cfg = compose_config(
        overrides(
            tmp_path,
            models_dir,
            f"data.path={src}",
            "data.name=texts",
            "data.id_column=null",
            "data.context_column=null",
            "data.continuations_column=null",
            "data.prompt_column=text",
        )
    )
    run_score(cfg)
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=True)
        row = rows[f"{i}-0"]
        if len(ids) < 2:
            assert "fewer than 2 tokens" in row["error"]
            continue
        total, greedy, _ = expected_score(model, ids, len(ids) - 1)
        assert (
            row["num_tokens"] == len(ids) - 1 and row["continuation"] is None and row["context_tokens"] == 1
        )
        assert row["logprob"] == pytest.approx(total, abs=1e-4) and row["is_greedy"] == greedy


def test_score_job_resumes_after_sigkill(tmp_path, models_dir, preloaded_cli):
    lines = [json.loads(line) for line in CHOICES.read_text().splitlines()]
    rows_in = [dict(r, id=f"{r['id']}-{k}") for k in range(6) for r in lines]  # 120 rows, 300 continuations
    src = write_jsonl(tmp_path / "many.jsonl", rows_in)
    args = overrides(
        tmp_path / "killed", models_dir, f"data.path={src}", "checkpoint.rows=6", "engine.max_num_seqs=4"
    )
    cfg = compose_config(args)
    manifest_path = output_dir(cfg) / MANIFEST_NAME
    proc = preloaded_cli.start(args)
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if Manifest.load(manifest_path).rows >= 30:
                break
        except Exception:
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.communicate()
    committed = Manifest.load(manifest_path)
    assert not committed.complete and 0 < committed.rows < 300
    stats = run_score(cfg)
    assert stats.complete and stats.skipped_rows > 0
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))  # asserts every custom_id once
    assert len(rows) == 300

    baseline_cfg = compose_config(overrides(tmp_path / "baseline", models_dir, f"data.path={src}"))
    run_score(baseline_cfg)
    expected = rows_by_custom_id(read_rows(output_dir(baseline_cfg)))
    assert set(rows) == set(expected)
    for cid, row in rows.items():
        e = expected[cid]
        assert (row["num_tokens"], row["token_ids"], row["error"]) == (
            e["num_tokens"],
            e["token_ids"],
            e["error"],
        )
        assert row["logprob"] == pytest.approx(e["logprob"], abs=1e-4)
    # The chunks hold score rows, and the generation schema is untouched.
    import pyarrow as pa

    from jobs.pipeline.manifest import GENERATIONS_DIR, read_stream

    first = read_stream(output_dir(cfg) / GENERATIONS_DIR / committed.chunks[0].file)
    assert first.schema.equals(SCORE_SCHEMA) and isinstance(first, pa.Table)

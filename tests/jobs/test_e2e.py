"""End to end with the real engine and the built-in tiny model: the CLI, resume after SIGKILL and SIGTERM."""

from __future__ import annotations

import json
import random
import signal
import time

import datasets
import pytest
import torch

from jobs.errors import JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs_helpers import (
    PROMPTS,
    compose_config,
    generated_part,
    read_rows,
    rows_by_custom_id,
    write_jsonl,
)

SOURCE_IDS = [json.loads(line)["id"] for line in PROMPTS.read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model runs fastest on one thread; two threads on a busy 2-core machine can be 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cli_default_job_writes_every_row(tmp_path, models_dir, preloaded_cli):
    proc = preloaded_cli.run(["job=synthetic_data", f"output_root={tmp_path}", f"models_dir={models_dir}"])
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "synthetic_data" / "tiny-chat-tiny-prompts"
    rows = rows_by_custom_id(read_rows(out))
    assert set(rows) == {f"{i}-{k}" for i in SOURCE_IDS for k in range(2)}
    assert all(
        r["error"] is None and r["completion_tokens"] == len(r["token_ids"]) > 0 for r in rows.values()
    )
    assert {r["finish_reason"] for r in rows.values()} <= {"stop", "length"}
    assert Manifest.load(out / MANIFEST_NAME).complete
    assert "row/s" in proc.stderr, "the progress bar"
    assert "100 rows" in proc.stderr and "tok/s" in proc.stderr and "device busy" in proc.stderr, (
        "the summary line"
    )
    assert "GPU busy" not in proc.stderr, "a CPU run says device busy"
    files = sorted(str(p) for p in (out / "generations").glob("*.arrow"))
    loaded = datasets.load_dataset("arrow", data_files=files, split="train")
    assert loaded.num_rows == 100 and loaded.features["token_ids"].feature.dtype == "int32"
    steps = datasets.load_dataset(
        "arrow", data_files=[str(p) for p in (out / "steps").glob("*.arrow")], split="train"
    )
    assert steps.num_rows > 0 and sum(steps["decode_tokens"]) > 0
    assert "builtin: tiny_chat" in (out / "config.yaml").read_text() and not (out / ".hydra").exists()


def test_cli_distill_writes_logprobs(tmp_path, models_dir, preloaded_cli):
    proc = preloaded_cli.run(
        ["job=distill", "data.limit=6", f"output_root={tmp_path}", f"models_dir={models_dir}"]
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "distill" / "tiny-chat-tiny-chats")
    assert sorted(r["id"] for r in rows) == SOURCE_IDS[:6]
    for r in rows:
        assert r["sampling"]["logprobs"] and r["sampling"]["temperature"] == 0.0
        assert len(r["logprobs"]) == r["completion_tokens"] > 0 and max(r["logprobs"]) <= 0.0
        assert json.loads(r["messages"])[-1]["role"] == "user"


def mixed_batch_file(path):
    """An OpenAI batch file whose rows use greedy decoding, explicit seeds and engine-derived seeds."""
    lines = []
    for i, line in enumerate(PROMPTS.read_text().splitlines()):
        row = json.loads(line)
        body = {"messages": row["messages"], "max_tokens": 24 + i % 17}
        if i % 3 == 0:
            body |= {"temperature": 0.0, "n": 1}
        elif i % 3 == 1:
            body |= {"temperature": 1.0, "seed": 1000 + i, "n": 2}
        else:
            body |= {"temperature": 0.9, "top_p": 0.9, "n": 2}
        lines.append({"custom_id": row["id"], "method": "POST", "url": "/v1/chat/completions", "body": body})
    return write_jsonl(path, lines)


def mixed_overrides(root, models_dir, batch):
    return [
        f"output_root={root}",
        f"models_dir={models_dir}",
        "data.format=openai_batch",
        f"data.path={batch}",
        "data.name=mixed",
        "data.id_column=custom_id",
        "data.prompt_column=prompt",
        "data.messages_column=messages",
        "engine.max_num_seqs=4",
        "checkpoint.rows=2",
        "runner.progress=false",
    ]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, models_dir):
    """The batch file and the rows of an uninterrupted run over it."""
    root = tmp_path_factory.mktemp("mixed")
    batch = mixed_batch_file(root / "batch.jsonl")
    cfg = compose_config(mixed_overrides(root / "baseline", models_dir, batch))
    run_generation(cfg)
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    assert len(rows) == 17 + 2 * 33
    assert {r["finish_reason"] for r in rows.values()} <= {"stop", "length"}
    return batch, {cid: generated_part(r) for cid, r in rows.items()}


def committed_rows(manifest_path) -> int:
    try:
        return Manifest.load(manifest_path).rows
    except Exception:  # not written yet
        return 0


def wait_for_rows(proc, manifest_path, rows, timeout=90):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and committed_rows(manifest_path) < rows and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigkills_then_a_sigterm_that_flushes_and_exits_143_and_the_resume_matches_uninterrupted_run(
    tmp_path, models_dir, mixed, preloaded_cli
):
    """Two SIGKILLs at random points, then a SIGTERM in the third start; each start resumes the last."""
    batch, expected = mixed
    args = mixed_overrides(tmp_path, models_dir, batch)
    cfg = compose_config(args)
    manifest_path = output_dir(cfg) / MANIFEST_NAME
    rng = random.Random(7)
    for threshold in (4, 30):
        proc = preloaded_cli.start(args)
        wait_for_rows(proc, manifest_path, threshold)
        time.sleep(rng.uniform(0.0, 0.25))
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.communicate()
    killed = committed_rows(manifest_path)
    assert killed >= 30
    proc = preloaded_cli.start(args)
    wait_for_rows(proc, manifest_path, killed + 10)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "interrupted: committed" in stderr and "SIGTERM" in stderr
    manifest = Manifest.load(manifest_path)
    assert not manifest.complete and killed + 10 <= manifest.rows < len(expected)
    assert len(rows_by_custom_id(read_rows(output_dir(cfg)))) == manifest.rows
    stats = run_generation(cfg)
    assert stats.complete and stats.skipped_rows > 0
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    assert {cid: generated_part(r) for cid, r in rows.items()} == expected


def test_unknown_model_fails_at_start_naming_it(tmp_path):
    cfg = compose_config([f"output_root={tmp_path}", "model=hf", f"model.model={tmp_path}/no-such-model"])
    assert cfg.model.name == "no-such-model"
    with pytest.raises(
        JobError, match="cannot load model 'no-such-model' from .*: no such folder: .*/no-such-model$"
    ):
        run_generation(cfg)
    (tmp_path / "empty").mkdir()
    cfg = compose_config([f"output_root={tmp_path}", "model=hf", f"model.model={tmp_path}/empty"])
    with pytest.raises(JobError, match=f"no config.json in {tmp_path}/empty$"):
        run_generation(cfg)

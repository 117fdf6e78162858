"""Top-k logprobs in jobs (real engine, built-in model): the Arrow columns, the limit a job sets, every
row once after kills with the columns of an uninterrupted run, and the distillation recipe of
docs/distillation.md run as printed."""

from __future__ import annotations

import re
import shutil

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs import distill, tiny_model
from jobs.generate import CONFIG_NAME, output_dir
from jobs.pipeline.manifest import GENERATIONS_DIR, MANIFEST_NAME, Manifest, read_stream
from jobs_helpers import ROOT, compose_config, read_rows, rows_by_custom_id

K = 30  # above the engine's default limit (20): the job raises it
ROWS = 20


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def overrides(root, models_dir) -> list[str]:
    return [
        "job=distill",
        f"job.sampling.top_logprobs={K}",
        "job.sampling.max_new_tokens=12",
        f"data.limit={ROWS}",
        "engine.max_num_seqs=4",
        "checkpoint.rows=2",
        "runner.progress=false",
        f"output_root={root}",
        f"models_dir={models_dir}",
    ]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, models_dir):
    """The rows of an uninterrupted run, by custom_id, and its output folder."""
    cfg = compose_config(overrides(tmp_path_factory.mktemp("top-baseline"), models_dir))
    assert distill.run(cfg).complete
    return rows_by_custom_id(read_rows(output_dir(cfg))), output_dir(cfg)


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # read-only: memory-mapped Arrow
def test_columns_hold_k_alternatives_per_token_and_load_with_datasets_and_torch(baseline):
    rows, out_dir = baseline
    assert len(rows) == ROWS
    assert f"max_top_logprobs: {K}" in (out_dir / CONFIG_NAME).read_text()  # the job raised the limit
    for r in rows.values():
        n = r["completion_tokens"]
        ids, lps = np.array(r["top_token_ids"]), np.array(r["top_logprobs"], dtype=np.float32)
        assert r["error"] is None and r["sampling"]["top_logprobs"] == K and ids.shape == lps.shape == (n, K)
        assert (np.diff(lps, axis=1) <= 0).all() and (lps <= 0).all()  # most likely first
        assert ids[:, 0].tolist() == r["token_ids"]  # greedy: the chosen token is the top one
        np.testing.assert_allclose(lps[:, 0], r["logprobs"], atol=1e-6)
        assert all(len(set(row)) == K for row in ids.tolist())
    files = sorted(str(p) for p in (out_dir / GENERATIONS_DIR).glob("*.arrow"))
    table = pa.concat_tables(read_stream(f) for f in files)
    rows_in_order = table.to_pylist()
    assert table.schema.field("top_token_ids").type == pa.list_(pa.list_(pa.int32()))
    assert table.schema.field("top_logprobs").type == pa.list_(pa.list_(pa.float32()))
    tokens = sum(r["completion_tokens"] for r in rows.values())
    for name, dtype in (("top_token_ids", torch.int32), ("top_logprobs", torch.float32)):
        # One flat buffer of 4 bytes per alternative per token, which torch takes without a copy.
        values = pa.concat_arrays(table[name].chunks).flatten().flatten()
        flat = torch.from_numpy(values.to_numpy(zero_copy_only=True))
        assert flat.dtype == dtype and flat.numel() == tokens * K and flat.element_size() == 4
    assert (
        flat.view(tokens, K)[: rows_in_order[0]["completion_tokens"]].tolist()
        == rows_in_order[0]["top_logprobs"]
    )
    ds = datasets.load_dataset("arrow", data_files=files, split="train").with_format("torch")
    row = ds[0]  # datasets' torch format: a [n, k] tensor per row (integers as int64, its convention)
    assert row["top_token_ids"].shape == (len(row["token_ids"]), K) == row["top_logprobs"].shape
    assert (
        row["top_logprobs"].dtype == torch.float32
        and row["top_token_ids"].tolist() == table["top_token_ids"][0].as_py()
    )


def test_killed_in_commits_then_resumed_every_row_once_with_the_same_columns(
    tmp_path, models_dir, baseline, preloaded_cli
):
    expected, _ = baseline
    args = overrides(tmp_path, models_dir)
    out_dir = output_dir(compose_config(args))
    # Killed after a chunk's rename (the chunk is adopted at the next start), inside a manifest write and
    # inside a step file's write (its chunk is adopted, the half-written file deleted), each process after
    # committing at least once.
    for spec in ("chunk-rename:signal=KILL@3", "manifest-write:signal=KILL@2", "chunk-write:signal=KILL@2"):
        proc = preloaded_cli.run(args, timeout=180, env={"BATCHGEN_FAULTS": spec})
        assert proc.returncode == -9, proc.stderr
    assert 0 < Manifest.load(out_dir / MANIFEST_NAME).rows < ROWS
    assert distill.run(compose_config(args)).complete
    rows = rows_by_custom_id(read_rows(out_dir))  # no custom_id twice
    assert rows.keys() == expected.keys()
    for cid, want in expected.items():
        got = rows[cid]
        assert got["token_ids"] == want["token_ids"] and got["top_token_ids"] == want["top_token_ids"], cid
        np.testing.assert_allclose(got["top_logprobs"], want["top_logprobs"], atol=1e-4)
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-4)


def test_a_k_above_the_limit_in_a_row_is_an_error_row_naming_the_key(tmp_path, models_dir):
    from jobs.generate import run_generation
    from jobs_helpers import write_jsonl

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True}
    batch = write_jsonl(
        tmp_path / "batch.jsonl",
        [
            {"custom_id": "ok", "body": body | {"top_logprobs": 20}},
            {"custom_id": "too-many", "body": body | {"top_logprobs": 21}},
        ],
    )
    cfg = compose_config(
        [
            "data=openai_batch",
            f"data.path={batch}",
            "runner.progress=false",
            f"output_root={tmp_path}",
            f"models_dir={models_dir}",
        ]
    )
    run_generation(cfg)
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    ok = rows["ok-0"]
    assert ok["error"] is None and len(ok["top_token_ids"]) == ok["completion_tokens"]
    assert {len(t) for t in ok["top_token_ids"]} == {20}
    error = rows["too-many-0"]["error"]
    assert (
        "top_logprobs=21 exceeds" in error and "limit of 20" in error and "engine.max_top_logprobs" in error
    )
    assert rows["too-many-0"]["top_token_ids"] is None


def recipe() -> str:
    """The Python block of docs/distillation.md."""
    (block,) = re.findall(
        r"^```python\n(.*?)^```", (ROOT / "docs" / "distillation.md").read_text(), re.S | re.M
    )
    return block


def run_recipe(run_dir, student) -> float:
    code = recipe()
    code = code.replace('"outputs/distill/tiny-chat-tiny-chats"', repr(str(run_dir)))
    code = code.replace('"/checkpoints/my-student"', repr(str(student)))
    namespace: dict = {}
    exec(compile(code, "docs/distillation.md", "exec"), namespace)
    assert len(namespace["terms"]) == 8 and all((t >= -1e-6).all() for t in namespace["terms"])
    assert any(p.grad is not None for p in namespace["student"].parameters())
    return float(namespace["kl"].detach())


def test_the_distillation_recipe_runs_as_printed(tmp_path, models_dir):
    assert (
        "python run.py job=distill job.sampling.top_logprobs=20"
        in (ROOT / "docs" / "distillation.md").read_text()
    )
    cfg = compose_config(
        ["job=distill", "job.sampling.top_logprobs=20", "data.limit=10", "runner.progress=false"]
        + [f"output_root={tmp_path}", f"models_dir={models_dir}", "checkpoint.rows=100"]
    )
    distill.run(cfg)
    assert output_dir(cfg) == tmp_path / "distill" / "tiny-chat-tiny-chats"
    teacher = tiny_model.materialise("tiny_chat", models_dir)
    assert run_recipe(output_dir(cfg), teacher) == pytest.approx(
        0.0, abs=1e-5
    )  # the teacher as its own student
    student = tmp_path / "student"
    shutil.copytree(teacher, student)
    weights = load_file(student / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file(
        {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
        student / "model.safetensors",
    )
    assert run_recipe(output_dir(cfg), student) > 1e-3


def test_runs_without_top_logprobs_keep_their_fingerprint(models_dir, tmp_path):
    from jobs.pipeline.fingerprint import fingerprint

    cfg = compose_config(["job=distill", f"output_root={tmp_path}", f"models_dir={models_dir}"])
    plain = fingerprint(cfg, distill.sampling_params(cfg))
    assert "top_logprobs" not in plain["sampling"]  # the fingerprint of runs made before the field existed
    asking = compose_config(["job=distill", "job.sampling.top_logprobs=5", f"output_root={tmp_path}"])
    assert fingerprint(asking, distill.sampling_params(asking))["sampling"]["top_logprobs"] == 5

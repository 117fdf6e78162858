"""Fault injection (fake engine): SIGKILL, SIGTERM and SIGINT at random moments and inside commits, and a full disk.

Faults inside a commit are placed with ``BATCHGEN_FAULTS`` (``jobs/pipeline/faults.py``); the others are sent
from outside at random times. After every fault the same run is started again; at the end every
(id, sample index) must be there exactly once, equal to an uninterrupted run, and every shard
must read back.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from jobs import cli, synthetic_data
from jobs.cli import register_configs
from jobs.errors import Interrupted, JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline import faults
from jobs.pipeline.manifest import GENERATIONS_DIR, MANIFEST_NAME, STEPS_DIR, Manifest, read_stream
from jobs_helpers import CONF_DIR, compose_config, fake_factory, generated_part, read_rows, rows_by_custom_id

SLOW_COMMITS = "chunk-write:sleep=0.004,chunk-rename:sleep=0.004,manifest-write:sleep=0.004"


def config(root, *overrides):
    return compose_config([f"output_root={root}", "runner.progress=false", "checkpoint.rows=2", *overrides])


def baseline(tmp_path, *overrides) -> dict:
    cfg = config(tmp_path / "baseline", *overrides)
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    return {cid: generated_part(r) for cid, r in rows_by_custom_id(read_rows(output_dir(cfg))).items()}


def _child(cfg, spec: str, started: Path) -> None:
    def step(engine) -> None:
        if engine.steps == 1:
            started.touch()
        time.sleep(0.002)

    code = 1
    try:
        os.environ[faults.ENV] = spec
        faults.reset()
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4, on_step=step)[1])
        code = 0
    except Interrupted as e:
        code = e.exit_code
    except KeyboardInterrupt:
        code = 130
    except JobError:
        code = 2
    finally:
        os._exit(code)


def run_child(cfg, spec: str, send: int | None = None, delay: float = 0.0) -> int:
    """Run the job in a forked process with faults ``spec``; optionally send it ``send`` ``delay`` s into its loop."""
    started = Path(cfg.run_dir).parent / "started"
    started.unlink(missing_ok=True)
    child = multiprocessing.get_context("fork").Process(target=_child, args=(cfg, spec, started))
    child.start()
    if send is not None:
        while not started.exists() and child.is_alive():
            time.sleep(0.001)
        time.sleep(delay)
        if child.is_alive():
            os.kill(child.pid, send)
    child.join(60)
    return child.exitcode


def assert_every_row_once(cfg, expected: dict) -> None:
    """Each (id, sample index) exactly once, equal to the uninterrupted run; every file listed and readable."""
    out = output_dir(cfg)
    manifest = Manifest.load(out / MANIFEST_NAME)
    assert manifest.complete
    rows = read_rows(out)
    keys = [(r["id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(expected)
    assert {cid: generated_part(r) for cid, r in rows_by_custom_id(rows).items()} == expected
    for folder, entries in ((GENERATIONS_DIR, manifest.chunks), (STEPS_DIR, manifest.steps)):
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(e.file for e in entries)
        for e in entries:
            assert read_stream(out / folder / e.file).num_rows == e.rows


def fault_plan(rng: random.Random, name: str, count: int, first: int = 1) -> list[tuple[str, int | None]]:
    """``count`` faults: half at a named commit point (its ``first``-th to ``first + 2``-th time), half at a random moment."""
    plan: list[tuple[str, int | None]] = []
    for k in range(count):
        if k % 2 == 0:
            point = faults.POINTS[(k // 2) % len(faults.POINTS)]
            plan.append((f"{point}:signal={name}@{rng.randint(first, first + 2)}", None))
        else:
            plan.append((SLOW_COMMITS, getattr(signal, "SIG" + name)))
    return plan


def test_resume_after_20_sigkills_including_inside_commits_has_every_row_once(tmp_path):
    expected = baseline(tmp_path)
    cfg = config(tmp_path / "killed")
    rng = random.Random(20)
    codes = [run_child(cfg, spec, send, rng.uniform(0.0, 0.15)) for spec, send in fault_plan(rng, "KILL", 20)]
    assert codes.count(-signal.SIGKILL) >= 18, codes
    partial = Manifest.load(output_dir(cfg) / MANIFEST_NAME)
    assert not partial.complete and 0 < partial.rows < len(expected)
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert_every_row_once(cfg, expected)


@pytest.mark.parametrize("name,status", [("TERM", 143), ("INT", 130)])
def test_resume_after_stop_signals_including_inside_commits_has_every_row_once(tmp_path, name, status):
    source = tmp_path / "prompts.jsonl"  # enough rows that 20 stops do not finish the run
    source.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(200)))
    data = ("data=jsonl", f"data.path={source}")
    expected = baseline(tmp_path, *data)
    cfg = config(tmp_path / name, *data)
    rng = random.Random(status)
    # From the 2nd hit on: the 1st manifest write is at start, before the handler (the default action stops it).
    for spec, send in fault_plan(rng, name, 20, first=2):
        assert run_child(cfg, spec, send, rng.uniform(0.0, 0.15)) == status
        out = output_dir(cfg)
        manifest = Manifest.load(out / MANIFEST_NAME)
        on_disk = sorted(p.name for p in (out / GENERATIONS_DIR).iterdir())
        assert on_disk == sorted(s.file for s in manifest.chunks), (
            "a graceful stop leaves no uncommitted file"
        )
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert_every_row_once(cfg, expected)


@pytest.mark.parametrize("point", faults.POINTS)
def test_disk_full_stops_with_a_clear_error_and_the_resume_completes(tmp_path, monkeypatch, point):
    expected = baseline(tmp_path)
    cfg = config(tmp_path / "full")
    monkeypatch.setenv(faults.ENV, f"{point}:enospc@4+")
    faults.reset()
    with pytest.raises(
        JobError, match=r"cannot commit \d+ rows to .*No space left on device.*run the same command"
    ):
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    out = output_dir(cfg)
    committed = read_rows(out)
    assert committed and len(committed) < len(expected)
    assert {
        cid: generated_part(r) for cid, r in rows_by_custom_id(committed).items()
    }.items() <= expected.items()
    assert not list((out / GENERATIONS_DIR).glob("*.tmp"))
    monkeypatch.delenv(faults.ENV)  # space is freed
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert_every_row_once(cfg, expected)


def test_fault_spec_fires_at_the_named_hits_only(monkeypatch):
    monkeypatch.setenv(faults.ENV, "chunk-write:enospc@2,manifest-write:enospc@2+")
    faults.reset()
    faults.inject("chunk-write")
    with pytest.raises(OSError, match="No space left"):
        faults.inject("chunk-write")
    faults.inject("chunk-write")
    faults.inject("manifest-write")
    for _ in range(2):
        with pytest.raises(OSError):
            faults.inject("manifest-write")
    faults.inject("chunk-rename")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("manifest-write:enospc@1", r"^error: cannot write .*No space left on device.*run again"),
        ("chunk-write:enospc@2+", r"^error: cannot commit \d+ rows to .*No space left on device.*resume"),
    ],
)
def test_disk_full_exits_with_status_2_and_one_line_message(tmp_path, monkeypatch, capsys, spec, message):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(
            "config", overrides=[f"output_root={tmp_path}", "runner.progress=false", "checkpoint.rows=2"]
        )
    fake = fake_factory(max_num_seqs=4)[1]
    monkeypatch.setattr(synthetic_data, "run", lambda cfg: run_generation(cfg, make_engine=fake))
    monkeypatch.setenv(faults.ENV, spec)
    faults.reset()
    assert cli.main(raw) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err

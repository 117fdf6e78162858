"""Crash safety with the fake engine: kills at random points, lost manifest updates, SIGTERM, leftovers."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest
from hydra import compose, initialize_config_dir

from jobs import cli, synthetic_data
from jobs.errors import Interrupted, JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline.manifest import GENERATIONS_DIR, MANIFEST_NAME, Manifest, read_stream
from jobs.pipeline.signals import StopSignal
from jobs_helpers import (
    CONF_DIR,
    compose_config,
    fake_factory,
    generated_part,
    read_rows,
    rows_by_custom_id,
)


def config(root, *overrides):
    return compose_config([f"output_root={root}", "runner.progress=false", "checkpoint.rows=3", *overrides])


def baseline_rows(tmp_path, *overrides) -> dict:
    cfg = config(tmp_path / "baseline", *overrides)
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    return {cid: generated_part(r) for cid, r in rows_by_custom_id(read_rows(output_dir(cfg))).items()}


def assert_same_rows(cfg, expected: dict) -> None:
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    assert {cid: generated_part(r) for cid, r in rows.items()} == expected
    assert Manifest.load(output_dir(cfg) / MANIFEST_NAME).complete


def _run_in_child(cfg, step_sleep: float) -> None:
    try:
        make = fake_factory(max_num_seqs=4, on_step=lambda e: time.sleep(step_sleep))[1]
        run_generation(cfg, make_engine=make)
    finally:
        os._exit(0)


def test_resume_after_sigkill_at_random_points_has_every_row_once(tmp_path):
    expected = baseline_rows(tmp_path)
    cfg = config(tmp_path / "killed")
    manifest = output_dir(cfg) / MANIFEST_NAME
    rng = random.Random(1234)
    ctx = multiprocessing.get_context("fork")
    kills = 0
    for _ in range(8):
        child = ctx.Process(target=_run_in_child, args=(cfg, 0.002))
        child.start()
        while not manifest.exists() and child.is_alive():
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join()
    assert kills >= 5
    engines, make = fake_factory(max_num_seqs=4)
    run_generation(cfg, make_engine=make)
    assert_same_rows(cfg, expected)
    committed_before_last_run = len(expected) - 2 * len(engines[0].added)
    assert committed_before_last_run > 0


def test_shard_renamed_but_not_in_manifest_is_adopted_without_duplicates(tmp_path, monkeypatch):
    expected = baseline_rows(tmp_path)
    cfg = config(tmp_path / "crashed")
    real_save, calls = Manifest.save, []

    def crash_on_fourth_save(self):
        calls.append(1)
        if len(calls) >= 4:  # the first save is at start: this is after the third shard's rename
            raise OSError("simulated crash before the manifest update")
        real_save(self)

    monkeypatch.setattr(Manifest, "save", crash_on_fourth_save)
    with pytest.raises(JobError, match="simulated crash"):
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    monkeypatch.setattr(Manifest, "save", real_save)
    on_disk = sorted(p.name for p in (output_dir(cfg) / GENERATIONS_DIR).glob("*.arrow"))
    listed = [s.file for s in Manifest.load(output_dir(cfg) / MANIFEST_NAME).chunks]
    orphans = set(on_disk) - set(listed)
    assert len(orphans) >= 1
    orphan_ids = {
        r["id"] for name in orphans for r in read_stream(output_dir(cfg) / GENERATIONS_DIR / name).to_pylist()
    }

    engines, make = fake_factory(max_num_seqs=4)
    run_generation(cfg, make_engine=make)
    assert orphan_ids and not orphan_ids & set(engines[0].added), "adopted rows are not generated again"
    assert_same_rows(cfg, expected)


def test_truncated_unlisted_shard_is_deleted_and_its_rows_generated_again(tmp_path):
    expected = baseline_rows(tmp_path)
    cfg = config(tmp_path / "truncated")
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    manifest = Manifest.load(output_dir(cfg) / MANIFEST_NAME)
    lost = manifest.chunks.pop(3)
    manifest.save()
    path = output_dir(cfg) / GENERATIONS_DIR / lost.file
    path.write_bytes(path.read_bytes()[:-20])
    (output_dir(cfg) / GENERATIONS_DIR / "shard-999999.arrow.tmp").write_bytes(b"half written")

    engines, make = fake_factory(max_num_seqs=4)
    stats = run_generation(cfg, make_engine=make)
    assert not path.exists() and not (output_dir(cfg) / GENERATIONS_DIR / "shard-999999.arrow.tmp").exists()
    assert stats.source_rows == lost.sources
    assert_same_rows(cfg, expected)


def test_shard_listed_but_missing_is_generated_again(tmp_path):
    expected = baseline_rows(tmp_path)
    cfg = config(tmp_path / "missing")
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    lost = Manifest.load(output_dir(cfg) / MANIFEST_NAME).chunks[2]
    (output_dir(cfg) / GENERATIONS_DIR / lost.file).unlink()
    stats = run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert stats.source_rows == lost.sources
    assert_same_rows(cfg, expected)


def test_sigterm_commits_finished_rows_and_reports_the_interruption(tmp_path):
    expected = baseline_rows(tmp_path)
    cfg = config(tmp_path / "terminated")

    def terminate_at_step_40(engine):
        if engine.steps == 40:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="interrupted: committed") as err:
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4, on_step=terminate_at_step_40)[1])
    assert signal.getsignal(signal.SIGTERM) is previous
    assert err.value.exit_code == 143 and err.value.signal_name == "SIGTERM"
    manifest = Manifest.load(output_dir(cfg) / MANIFEST_NAME)
    assert 0 < manifest.rows < len(expected) and not manifest.complete
    assert manifest.rows == len(read_rows(output_dir(cfg)))
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert_same_rows(cfg, expected)


@pytest.fixture
def usr2_outside():
    """What reaches the SIGUSR2 handler that a job replaces (submitit's, in a task)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGUSR2, previous)


def usr2_at_the_completion_marker(monkeypatch, after: bool) -> None:
    """Send SIGUSR2 to this process while the completion marker is written (``after``: once it is in place)."""
    real_save = Manifest.save

    def save(self, *args, **kwargs):
        if self.complete and not after:  # as during a slow fsync of the marker, before its rename
            os.kill(os.getpid(), signal.SIGUSR2)
        written = real_save(self, *args, **kwargs)
        if self.complete and after:
            os.kill(os.getpid(), signal.SIGUSR2)
        return written

    monkeypatch.setattr(Manifest, "save", save)


def test_a_stop_signal_while_the_completion_marker_is_written_stops_the_run_with_every_row_committed(
    tmp_path, monkeypatch, usr2_outside
):
    expected = baseline_rows(tmp_path)
    cfg = config(tmp_path / "stopped")
    usr2_at_the_completion_marker(monkeypatch, after=False)
    with pytest.raises(Interrupted, match="interrupted: committed") as err:
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert err.value.exit_code == 140 and not usr2_outside, "the job's handler, not the one it replaced"
    manifest = Manifest.load(output_dir(cfg) / MANIFEST_NAME)
    assert not manifest.complete and manifest.rows == len(expected)
    monkeypatch.undo()
    engines, make = fake_factory(max_num_seqs=4)
    stats = run_generation(cfg, make_engine=make)
    assert stats.complete and engines[0].added == [], "the resume generates nothing again"
    assert_same_rows(cfg, expected)


def test_a_stop_signal_once_the_completion_marker_is_in_place_leaves_the_run_complete(
    tmp_path, monkeypatch, usr2_outside
):
    cfg = config(tmp_path / "done")
    usr2_at_the_completion_marker(monkeypatch, after=True)
    stats = run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert stats.complete and not usr2_outside
    assert Manifest.load(output_dir(cfg) / MANIFEST_NAME).complete


def test_second_stop_signal_stops_at_once():
    with StopSignal() as stop, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signum == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("crash_at_save", [2, 3, 4, 5])
def test_resume_treats_repeated_ids_the_same_and_writes_every_row_once(tmp_path, monkeypatch, crash_at_save):
    ids = ["a", "b", "a", "c", "b", "d", "a", "e"]
    data = tmp_path / "dups.jsonl"
    data.write_text("".join(f'{{"id": "{i}", "prompt": "row {k}"}}\n' for k, i in enumerate(ids)))
    settings = (f"data.path={data}", "checkpoint.rows=1", "job.sampling.n=2")
    expected = baseline_rows(tmp_path, *settings)
    cfg = config(tmp_path / "crashed", *settings)
    real_save, calls = Manifest.save, []

    def crash(self):
        calls.append(1)
        if len(calls) == crash_at_save:  # the chunk is renamed into place, the manifest update is lost
            raise OSError("simulated crash before the manifest update")
        real_save(self)

    monkeypatch.setattr(Manifest, "save", crash)
    with pytest.raises(JobError, match="simulated crash"):
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    monkeypatch.setattr(Manifest, "save", real_save)
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert_same_rows(cfg, expected)
    assert len(expected) == 2 * len(ids)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_listed_chunk_stops_with_status_2_naming_it_and_deleting_it_regenerates_its_rows(
    tmp_path, monkeypatch, capsys, damage
):
    expected = baseline_rows(tmp_path, "data.limit=20")
    cfg = config(tmp_path / "damaged", "data.limit=10")
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])  # complete at 10: the resume reads it
    lost = Manifest.load(output_dir(cfg) / MANIFEST_NAME).chunks[1]
    path = output_dir(cfg) / GENERATIONS_DIR / lost.file
    path.write_bytes(path.read_bytes()[:-20] if damage == "truncated" else b"not arrow" * 20)

    cli.register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(
            "config",
            overrides=[f"output_root={tmp_path / 'damaged'}", "runner.progress=false", "checkpoint.rows=3"]
            + ["data.limit=20"],
        )
    engines, make = fake_factory(max_num_seqs=4)
    monkeypatch.setattr(synthetic_data, "run", lambda c: run_generation(c, make_engine=make))
    assert cli.main(raw) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert str(path) in err and "cannot be read" in err
    assert "delete it and run the same command again" in err and f"its {lost.rows} rows" in err
    assert engines == [], "stopped before the model loads"

    path.unlink()  # as the message says
    stats = run_generation(config(tmp_path / "damaged", "data.limit=20"), make_engine=make)
    assert stats.source_rows == 10 + lost.sources
    assert_same_rows(config(tmp_path / "damaged", "data.limit=20"), expected)

"""Two processes pointed at one output directory: the second refuses; the lock goes with its holder, even on SIGKILL."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from jobs.errors import JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline.lock import LOCK_NAME, run_lock
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs_helpers import compose_config, fake_factory, read_rows, rows_by_custom_id


def config(root, *overrides):
    return compose_config([f"output_root={root}", "runner.progress=false", "checkpoint.rows=2", *overrides])


def _slow_run(cfg) -> None:
    try:
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=2, on_step=lambda e: time.sleep(0.05))[1])
    finally:
        os._exit(0)


def test_second_process_on_the_same_output_dir_refuses_and_the_lock_dies_with_the_first(tmp_path):
    cfg = config(tmp_path)
    first = multiprocessing.get_context("fork").Process(target=_slow_run, args=(cfg,))
    first.start()
    manifest = output_dir(cfg) / MANIFEST_NAME
    while not manifest.exists():
        time.sleep(0.005)
    engines, make = fake_factory(max_num_seqs=4)
    with pytest.raises(
        JobError, match=rf"is in use by another run \(pid {first.pid} on .*\).*another run_dir"
    ):
        run_generation(cfg, make_engine=make)
    assert not engines, "the second process did not load a model nor write anything"
    os.kill(first.pid, signal.SIGKILL)
    first.join()
    run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    assert len(rows) == 100 and Manifest.load(manifest).complete


def test_lock_is_released_when_the_run_ends_or_fails(tmp_path):
    with run_lock(tmp_path), pytest.raises(JobError, match="in use by another run"), run_lock(tmp_path):
        pass
    with pytest.raises(RuntimeError), run_lock(tmp_path):
        raise RuntimeError("boom")
    with run_lock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()

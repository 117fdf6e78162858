"""Split runs through Hydra's submitit launcher on this machine (hydra/launcher=local), with the real engine:
the shards together write exactly the rows of one run, a killed shard is the only one run again, and a
preempted shard (USR2) commits, is requeued by submitit and resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.merge import load_run
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs.pipeline.shards import shard_subdir
from jobs_helpers import ROOT, cli_env, read_rows, rows_by_custom_id, run_cli, single_run_rows

RUN = Path("synthetic_data") / "tiny-chat-tiny-prompts"
# The embedded default on the first 24 rows; one request at a time and a commit per request, so that a
# shard commits several times before it ends. Scheduling settings do not change the rows.
SETTINGS = [
    "job=synthetic_data",
    "data.limit=24",
    "engine.max_num_seqs=2",
    "checkpoint.rows=2",
    "runner.progress=false",
]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, models_dir) -> dict[str, dict]:
    """The rows of one unsplit run, keyed by custom_id."""
    rows = single_run_rows(tmp_path_factory.mktemp("single"), models_dir, SETTINGS)
    assert len(rows) == 48
    return rows


def multirun_args(root, models_dir, count):
    return [
        "-m",
        *SETTINGS,
        f"shard.count={count}",
        f"shard.index=range({count})",
        "hydra/launcher=local",
        f"output_root={root}",
        f"models_dir={models_dir}",
    ]


def shard_dir(root, index, count) -> Path:
    return root / RUN / shard_subdir(index, count)


def all_rows(root, count) -> dict[str, dict]:
    """The rows of every shard, asserting that none appears twice."""
    rows = []
    for index in range(count):
        part = read_rows(shard_dir(root, index, count))
        assert {r["row_index"] % count for r in part} <= {index}
        rows += part
    return rows_by_custom_id(rows)


def manifest(root, index, count) -> Manifest | None:
    try:
        return Manifest.load(shard_dir(root, index, count) / MANIFEST_NAME)
    except Exception:  # being written
        return None


def wait_for_pid(root, index, count, rows, proc, timeout=120) -> int:
    """The pid of shard ``index`` (from its log) once it has committed ``rows`` rows, stopped (SIGSTOP) there."""
    log = shard_dir(root, index, count) / "run.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        m = manifest(root, index, count)
        pids = re.findall(r"pid (\d+)", log.read_text()) if log.exists() else []
        if pids and m is not None and m.rows >= rows:
            pid = int(pids[-1])
            os.kill(pid, signal.SIGSTOP)
            if not manifest(root, index, count).complete:
                return pid
            os.kill(pid, signal.SIGCONT)
            pytest.fail(f"shard {index} finished before it could be stopped")
        time.sleep(0.01)
    pytest.fail(f"shard {index} committed no rows in time")


def wait_until(condition, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.05)


@pytest.fixture
def start_multirun():
    """Start ``python run.py <args>`` in the background; a multirun still running at the end is killed."""
    started: list[subprocess.Popen] = []

    def start(args) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "run.py", *args],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_four_shards_write_exactly_the_rows_of_a_single_run(tmp_path, models_dir, single_run):
    proc = run_cli(multirun_args(tmp_path, models_dir, 4), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all_rows(tmp_path, 4) == single_run
    assert rows_by_custom_id(load_run(tmp_path / RUN).to_list()) == single_run
    assert sorted(p.name for p in (tmp_path / RUN).iterdir() if p.name.startswith("shard-")) == [
        shard_subdir(i, 4) for i in range(4)
    ]
    again = run_cli(multirun_args(tmp_path, models_dir, 4), timeout=120)
    assert again.returncode == 0 and again.stdout.count("complete, not launched") == 4, again.stdout
    assert all(manifest(tmp_path, i, 4).attempts == 1 for i in range(4))


def test_killed_shard_is_the_only_one_run_again(tmp_path, models_dir, single_run, start_multirun):
    proc = start_multirun(multirun_args(tmp_path, models_dir, 2))
    pid = wait_for_pid(tmp_path, 1, 2, rows=2, proc=proc)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: getattr(manifest(tmp_path, 0, 2), "complete", False))
    proc.kill()  # rather than wait for submitit to give up on the lost task's result (15 s)
    out, _ = proc.communicate()
    killed = manifest(tmp_path, 1, 2)
    assert not killed.complete and 0 < killed.rows < 24
    done = manifest(tmp_path, 0, 2)
    assert done.complete and done.attempts == 1, out
    again = run_cli(multirun_args(tmp_path, models_dir, 2), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "complete, not launched: " in again.stdout and "shard.index=0" in again.stdout
    assert again.stdout.count("complete, not launched") == 1
    assert manifest(tmp_path, 0, 2) == done, "the finished shard is untouched"
    resumed = manifest(tmp_path, 1, 2)
    assert resumed.complete and resumed.attempts == 2
    log = (shard_dir(tmp_path, 1, 2) / "run.log").read_text()
    assert f"attempt 2, {killed.rows} rows already committed" in log
    assert all_rows(tmp_path, 2) == single_run


def test_preempted_shard_commits_is_requeued_and_resumes(tmp_path, models_dir, single_run, start_multirun):
    proc = start_multirun(multirun_args(tmp_path, models_dir, 2))
    pid = wait_for_pid(tmp_path, 1, 2, rows=2, proc=proc)
    os.kill(pid, signal.SIGUSR2)  # what submitit's executors send before the time limit
    os.kill(pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    m = manifest(tmp_path, 1, 2)
    assert m.complete and m.attempts == 2
    log = (shard_dir(tmp_path, 1, 2) / "run.log").read_text()
    assert "interrupted: committed" in log and "SIGUSR2, exit status 140" in log
    assert "Requeued job" in log and "attempt 2," in log
    assert all_rows(tmp_path, 2) == single_run


def test_failed_tasks_are_each_named_with_their_own_error_in_one_line(tmp_path, models_dir):
    args = [*multirun_args(tmp_path, models_dir, 2), "data=jsonl", "data.path=/nonexistent/prompts.jsonl"]
    proc = run_cli(args, timeout=180)
    err = proc.stderr
    assert proc.returncode == 1, err
    assert "2 of 2 tasks failed" in err and "UncompletedJobError" not in err and "Traceback" not in err, err
    for index in range(2):
        line = next(ln for ln in err.splitlines() if ln.strip().startswith(f"#{index} ("))
        assert f"shard.index={index}" in line, line
        assert line.endswith("error: data.path: no such file or directory: '/nonexistent/prompts.jsonl'"), (
            line
        )


def test_a_task_error_is_its_last_error_line_or_the_last_line():
    from hydra_plugins.batchgen_launcher.launchers import task_error

    assert (
        task_error("noise\nerror: data.path: missing\nmore\n", ValueError("x")) == "error: data.path: missing"
    )
    assert task_error("Traceback ...\n  File x\nKeyError: 'a'\n", ValueError("x")) == "KeyError: 'a'"
    assert (
        task_error("", RuntimeError("Traceback\n  File y\nZeroDivisionError: boom"))
        == "ZeroDivisionError: boom"
    )


def test_a_multirun_into_the_folder_of_an_unsplit_run_is_refused_before_submitting(tmp_path, models_dir):
    """The README's order: the default job, then the split multirun with the same run folder."""
    first = run_cli([*SETTINGS, "data.limit=2", f"output_root={tmp_path}", f"models_dir={models_dir}"])
    assert first.returncode == 0, first.stderr
    proc = run_cli(multirun_args(tmp_path, models_dir, 2))
    assert proc.returncode == 2 and "holds an unsplit run (manifest.json)" in proc.stderr, proc.stderr
    assert f"run_dir={tmp_path / RUN}-2-shards" in proc.stderr and "overwrite=true" in proc.stderr
    assert not list((tmp_path / RUN).glob("shard-*")) and not (tmp_path / RUN / ".submitit").exists()

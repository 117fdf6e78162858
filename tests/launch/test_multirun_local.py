"""Split runs through Hydra's submitit launcher on this machine (hydra/launcher=local), with the real engine:
the shards together write exactly the rows of one run, a preempted shard (USR2) commits, is requeued by
submitit and resumes, and a killed shard is the only one run again."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from jobs.merge import load_run
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs.pipeline.shards import shard_subdir
from jobs_helpers import PreloadedRun, read_rows, rows_by_custom_id, single_run_rows

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


def stop_when_committed(root, indices, count, rows, proc, timeout=120) -> dict[int, int]:
    """The pids of shards ``indices`` (from their logs), each stopped (SIGSTOP) once it has committed ``rows`` rows."""
    stopped: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(stopped) < len(indices) and time.monotonic() < deadline and proc.poll() is None:
        for index in set(indices) - stopped.keys():
            log = shard_dir(root, index, count) / "run.log"
            m = manifest(root, index, count)
            pids = re.findall(r"pid (\d+)", log.read_text()) if log.exists() else []
            if pids and m is not None and m.rows >= rows:
                pid = int(pids[-1])
                os.kill(pid, signal.SIGSTOP)
                if manifest(root, index, count).complete:
                    os.kill(pid, signal.SIGCONT)
                    pytest.fail(f"shard {index} finished before it could be stopped")
                stopped[index] = pid
        time.sleep(0.01)
    missing = sorted(set(indices) - stopped.keys())
    if missing:
        pytest.fail(f"shard(s) {missing} committed no rows in time")
    return stopped


@pytest.fixture
def start_multirun(preloaded_cli):
    """Start ``python run.py <args>`` in the background; a multirun still running at the end is killed."""
    started: list[PreloadedRun] = []

    def start(args) -> PreloadedRun:
        started.append(preloaded_cli.start(args))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()


def test_three_shards_write_exactly_the_rows_of_a_single_run(tmp_path, models_dir, single_run, preloaded_cli):
    proc = preloaded_cli.run(multirun_args(tmp_path, models_dir, 3), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all_rows(tmp_path, 3) == single_run
    assert rows_by_custom_id(load_run(tmp_path / RUN).to_list()) == single_run
    assert sorted(p.name for p in (tmp_path / RUN).iterdir() if p.name.startswith("shard-")) == [
        shard_subdir(i, 3) for i in range(3)
    ]
    again = preloaded_cli.run(multirun_args(tmp_path, models_dir, 3), timeout=120)
    assert again.returncode == 0 and again.stdout.count("complete, not launched") == 3, again.stdout
    assert all(manifest(tmp_path, i, 3).attempts == 1 for i in range(3))


def test_preempted_shard_resumes_and_a_killed_one_is_the_only_one_run_again(
    tmp_path, models_dir, single_run, start_multirun, preloaded_cli
):
    """Shard 0 gets USR2 (what submitit's executors send before the time limit): it commits, submitit
    requeues it and it resumes. Shard 1 is killed: the multirun fails naming it, and the same command
    runs only it again."""
    proc = start_multirun(multirun_args(tmp_path, models_dir, 2))
    pids = stop_when_committed(tmp_path, [0, 1], 2, rows=2, proc=proc)
    os.kill(pids[1], signal.SIGKILL)
    os.kill(pids[0], signal.SIGUSR2)
    os.kill(pids[0], signal.SIGCONT)
    out = "".join(proc.communicate(timeout=300))
    assert proc.returncode == 1 and "1 of 2 tasks failed" in out, out
    failed = [ln.strip() for ln in out.splitlines() if ln.strip().startswith(("#0 (", "#1 ("))]
    assert len(failed) == 1 and failed[0].startswith("#1 (") and "shard.index=1" in failed[0], out
    done = manifest(tmp_path, 0, 2)
    assert done.complete and done.attempts == 2, out
    log = (shard_dir(tmp_path, 0, 2) / "run.log").read_text()
    assert "interrupted: committed" in log and "SIGUSR2, exit status 140" in log
    assert "Requeued job" in log and "attempt 2," in log
    killed = manifest(tmp_path, 1, 2)
    assert not killed.complete and killed.attempts == 1 and 0 < killed.rows < 24
    again = preloaded_cli.run(multirun_args(tmp_path, models_dir, 2), timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "complete, not launched: " in again.stdout and "shard.index=0" in again.stdout
    assert again.stdout.count("complete, not launched") == 1
    assert manifest(tmp_path, 0, 2) == done, "the finished shard is untouched"
    resumed = manifest(tmp_path, 1, 2)
    assert resumed.complete and resumed.attempts == 2
    log = (shard_dir(tmp_path, 1, 2) / "run.log").read_text()
    assert f"attempt 2, {killed.rows} rows already committed" in log
    assert all_rows(tmp_path, 2) == single_run


def test_failed_tasks_are_each_named_with_their_own_error_in_one_line(tmp_path, models_dir, preloaded_cli):
    args = [*multirun_args(tmp_path, models_dir, 2), "data=jsonl", "data.path=/nonexistent/prompts.jsonl"]
    proc = preloaded_cli.run(args, timeout=180)
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


def test_a_multirun_into_the_folder_of_an_unsplit_run_is_refused_before_submitting(
    tmp_path, models_dir, preloaded_cli
):
    """The README's order: the default job, then the split multirun with the same run folder."""
    assert len(single_run_rows(tmp_path, models_dir, [*SETTINGS, "data.limit=2"])) == 4
    proc = preloaded_cli.run(multirun_args(tmp_path, models_dir, 2))
    assert proc.returncode == 2 and "holds an unsplit run (manifest.json)" in proc.stderr, proc.stderr
    assert f"run_dir={tmp_path / RUN}-2-shards" in proc.stderr and "overwrite=true" in proc.stderr
    assert not list((tmp_path / RUN).glob("shard-*")) and not (tmp_path / RUN / ".submitit").exists()

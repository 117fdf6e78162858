"""The Slurm path on a real single-node cluster (``scripts/slurm_local.sh``), through the README's multirun.

Marked ``slurm``; skipped unless ``sbatch`` is on the PATH and the cluster answers. Each scenario runs
``python run.py -m ... hydra/launcher=slurm`` with CPU-sized resources and ends by reading every
shard's committed Arrow files: each row of the source, each sample, exactly once.

A task's first attempt is slowed down (``BATCHGEN_FAULTS`` sleeps at each manifest commit) so that it
can be interrupted after a few commits and before its end; the launcher's ``setup`` line drops the
fault in later attempts (``SLURM_RESTART_COUNT`` > 0), so requeued tasks finish quickly. The three
scenarios run side by side (the cluster shares its CPUs between small tasks) to keep CI short:

- three tasks, then the merge job, and the merge as a job depending on the array (``afterok``);
- an array whose task 0 is preempted (``scancel -s USR2``), task 1 hard-requeued (``scontrol
  requeue``) and task 2 cancelled (``scancel``), then the merge and the same command again;
- a one-minute time limit with a 10 s signal delay: signalled before the limit, requeued, finished.

Without accounting storage, the launcher follows the tasks with ``squeue`` (tested here without a
cluster too): no ``sacct`` warnings, and a cancelled task ends the wait.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from hydra_plugins.batchgen_launcher import launchers
from jobs_helpers import PROMPTS, ROOT, PreloadedCli, PreloadedRun, read_rows, rows_by_custom_id

RUN = Path("synthetic_data") / "tiny-chat-tiny-prompts"
SAMPLES = 2  # job=synthetic_data's sampling.n
SETTINGS = ["job=synthetic_data", "engine.max_num_seqs=2", "checkpoint.rows=2", "runner.progress=false"]
# Slow first attempts: each manifest commit sleeps; the setup line (run by the sbatch script before
# the task) drops the fault once Slurm has restarted the task ("0$X" is 0 when X is unset).
SLOW = {"BATCHGEN_FAULTS": "manifest-write:sleep=2"}
SETUP = 'hydra.launcher.setup=["if [ 0$SLURM_RESTART_COUNT -gt 0 ]; then unset BATCHGEN_FAULTS; fi"]'
DOCS = ROOT / "docs" / "jobs.md"
TIME_LIMIT_ROWS = 24  # source rows of the time-limit scenario


def cluster_problem() -> str | None:
    """Why the cluster tests cannot run here, or None when ``sbatch`` is there and the node takes jobs."""
    if shutil.which("sbatch") is None:
        return "no sbatch on the PATH (scripts/slurm_local.sh starts a single-node cluster)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    if not any(s.startswith(("idle", "mix", "alloc")) for s in proc.stdout.split()):
        return f"no Slurm node takes jobs: {(proc.stdout + proc.stderr).strip()!r}"
    return None


PROBLEM = cluster_problem()
needs_cluster = pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")


def slurm_args(root: Path, models_dir: Path, name: str, count: int, limit: int, *extra: str) -> list[str]:
    """The README's multirun on partition ``debug`` without GPUs, one CPU and 1 GB per task."""
    return [
        "-m",
        *SETTINGS,
        f"data.limit={limit}",
        f"shard.count={count}",
        f"shard.index=range({count})",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        f"hydra.launcher.name={name}",
        SETUP,
        *extra,
        f"output_root={root}",
        f"models_dir={models_dir}",
    ]


def shard_dir(root: Path, index: int, count: int) -> Path:
    """A shard's folder (an unsplit run, count 1, writes into the run directory itself)."""
    return root / RUN / (f"shard-{index:05d}-of-{count:05d}" if count > 1 else "")


def manifest(root: Path, index: int, count: int) -> dict | None:
    """The shard's manifest.json, or None before its first commit."""
    try:
        return json.loads((shard_dir(root, index, count) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def committed(m: dict | None) -> int:
    """The rows a manifest lists as committed."""
    return sum(s["rows"] for s in m["chunks"]) if m else 0


def expected_ids(limit: int, index: int, count: int) -> set[str]:
    """The custom_ids of shard ``index`` of ``count`` over the first ``limit`` source rows."""
    ids = [json.loads(line)["id"] for line in PROMPTS.read_text().splitlines()[:limit]]
    return {f"{ids[i]}-{s}" for i in range(limit) if i % count == index for s in range(SAMPLES)}


def shard_rows(root: Path, index: int, count: int, limit: int) -> dict[str, dict]:
    """The committed rows of a complete shard, asserting each expected row is there exactly once."""
    m = manifest(root, index, count)
    assert m is not None and m["complete"], f"shard {index} not complete: {m}"
    rows = rows_by_custom_id(read_rows(shard_dir(root, index, count)))  # asserts no duplicate
    assert set(rows) == expected_ids(limit, index, count)
    return rows


def shard_log(root: Path, index: int, count: int) -> str:
    return (shard_dir(root, index, count) / "run.log").read_text()


def wait_until(what: str, condition: Callable[[], object], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def array_id(name: str) -> str:
    """The id of the one array named ``name`` in the queue (what ``squeue -o %F`` prints)."""
    found: list[str] = []

    def listed() -> bool:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%F"], capture_output=True, text=True)
        found[:] = sorted(set(out.stdout.split()))
        return bool(found)

    wait_until(f"array {name}", listed, timeout=60)
    assert len(found) == 1, found
    return found[0]


def job_state(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T|%r"], capture_output=True, text=True
    )
    return out.stdout.strip()


def committed_mid_run(root: Path, index: int, count: int, rows: int, proc: PreloadedRun) -> dict:
    """Wait for shard ``index`` to commit ``rows`` rows; its manifest then (the shard not complete)."""
    seen: dict = {}

    def enough() -> bool:
        assert proc.poll() is None, "".join(proc.communicate())
        seen.update(manifest(root, index, count) or {})
        return committed(seen) >= rows

    wait_until(f"shard {index} to commit {rows} rows", enough)
    assert not seen["complete"], f"shard {index} finished before it could be interrupted"
    return seen


def slurm(*args: str) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


class Multirun:
    """``python run.py <args>`` in the background, its output collected; ``name`` is its array's name."""

    def __init__(
        self, cli: PreloadedCli, args: list[str], name: str, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.proc = cli.start(args, env)
        self.output: str | None = None

    def wait(self, timeout: float = 240) -> int:
        if self.output is None:
            self.output = "".join(self.proc.communicate(timeout=timeout))
        return self.proc.returncode

    def kill(self) -> None:
        """Stop the multirun if still running, and cancel what is left of its array."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        subprocess.run(["scancel", f"--name={self.name}"], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def time_limit_run(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, preloaded_cli: PreloadedCli
) -> Iterator[tuple[Path, Multirun]]:
    """One task with a one-minute limit and a 10 s signal delay, started after the interrupted array, beside it.

    Slurm checks time limits every 30 s and sends the signal up to that much early, so USR2 comes
    20 to 50 s after the start and the limit is enforced at 60 to 90 s. The first attempt is still
    running at 50 s: after the model loads, each commit sleeps 4 s, and the background writer
    commits two source rows at a time, so its TIME_LIMIT_ROWS rows take a minute to commit.
    """
    root = tmp_path_factory.mktemp("timelimit")
    args = slurm_args(
        root,
        models_dir,
        "bg-timelimit",
        1,
        TIME_LIMIT_ROWS,
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.signal_delay_s=10",
    )
    run = Multirun(preloaded_cli, args, "bg-timelimit", env={"BATCHGEN_FAULTS": "manifest-write:sleep=4"})
    yield root, run
    run.kill()


@pytest.fixture(scope="module")
def three_tasks(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    time_limit_run: tuple[Path, Multirun],
    interrupted_start: tuple[Path, list[str], Multirun, Future],
    preloaded_cli: PreloadedCli,
) -> Iterator[tuple[Path, Multirun, str, Path]]:
    """A 3-task array, and the docs' dependent merge (``sbatch --dependency=afterok:<array>``) submitted meanwhile.

    Started once the interrupted array's tasks are interrupted: it runs while they wait to be requeued.

    Yields the output root, the finished multirun, the merge job's id and its log file.
    """
    interrupted_start[3].result(timeout=240)
    root = tmp_path_factory.mktemp("three")
    cleanup: list[str] = []
    run = Multirun(preloaded_cli, slurm_args(root, models_dir, "bg-three", 3, 9), "bg-three")
    try:
        array = array_id("bg-three")
        merge_log = root / "merge.out"
        recipe = dependent_merge_recipe()
        command = (
            recipe.replace("batchgen-synthetic_data", "bg-three")
            .replace("outputs/synthetic_data/tiny-chat-tiny-prompts", str(root / RUN))
            .replace("python run.py", f"{sys.executable} run.py")
            .replace("sbatch ", f"sbatch --parsable --mem=1G --output={merge_log} ", 1)
        )
        submitted = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert submitted.returncode == 0, submitted.stderr
        merge_job = submitted.stdout.strip().split(";")[0]
        cleanup.append(merge_job)
        queued = subprocess.run(
            ["squeue", "-h", "-j", merge_job, "-o", "%T|%E"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        assert queued.startswith("PENDING|") and f"afterok:{array}" in queued, queued
        run.wait()
        yield root, run, merge_job, merge_log
    finally:
        run.kill()
        if cleanup:
            subprocess.run(["scancel", *cleanup], capture_output=True, timeout=30)


def dependent_merge_recipe() -> str:
    """The one-line ``sbatch --dependency=afterok`` recipe of docs/jobs.md."""
    lines = [
        line.strip()
        for line in DOCS.read_text().splitlines()
        if line.strip().startswith("sbatch --dependency")
    ]
    assert len(lines) == 1, lines
    return lines[0]


def interrupt(root: Path, proc: PreloadedRun) -> dict[str, dict]:
    """Once each has committed rows: USR2 to task 0, ``scontrol requeue`` task 1, cancel task 2.

    Returns task 1's committed rows as they were just before its requeue.
    """
    array = array_id("bg-interrupted")
    committed_mid_run(root, 0, 3, 2, proc)
    slurm("scancel", "-s", "USR2", f"{array}_0")
    committed_mid_run(root, 1, 3, 2, proc)
    requeued_rows = rows_by_custom_id(read_rows(shard_dir(root, 1, 3)))
    slurm("scontrol", "requeue", f"{array}_1")
    committed_mid_run(root, 2, 3, 2, proc)
    slurm("scancel", f"{array}_2")
    return requeued_rows


@pytest.fixture(scope="module")
def interrupted_start(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, preloaded_cli: PreloadedCli
) -> Iterator[tuple[Path, list[str], Multirun, Future]]:
    """The array of ``interrupted_array`` started, its interruptions sent from a thread as soon as due."""
    root = tmp_path_factory.mktemp("interrupted")
    args = slurm_args(root, models_dir, "bg-interrupted", 3, 18)
    run = Multirun(preloaded_cli, args, "bg-interrupted", env=SLOW)
    with ThreadPoolExecutor(1) as pool:
        try:
            yield root, args, run, pool.submit(interrupt, root, run.proc)
        finally:
            run.kill()


@pytest.fixture(scope="module")
def interrupted_array(
    interrupted_start: tuple[Path, list[str], Multirun, Future], preloaded_cli: PreloadedCli
) -> dict:
    """A 3-task array: task 0 gets USR2, task 1 a hard requeue, task 2 is cancelled; then merge, and the command again."""
    root, args, run, interrupted = interrupted_start
    requeued_rows = interrupted.result(timeout=240)
    status = run.wait()
    # the launcher may return as soon as task 2 is known cancelled: wait for the requeued tasks
    for i in (0, 1):
        wait_until(f"shard {i} to complete", lambda i=i: (manifest(root, i, 3) or {}).get("complete"))
    merge = preloaded_cli.run(["job=merge", f"run_dir={root / RUN}"], timeout=120)
    again = preloaded_cli.run(args, timeout=240)
    return {
        "root": root,
        "status": status,
        "output": run.output,
        "requeued_rows": requeued_rows,
        "merge": merge,
        "again": again,
    }


@pytest.mark.slurm
@needs_cluster
def test_three_task_array_writes_every_row_once_then_merges(three_tasks, preloaded_cli):
    root, run, _, _ = three_tasks
    assert run.wait() == 0, run.output
    assert "Bypassing sacct error" not in run.output and "storage is disabled" not in run.output, (
        "no sacct noise"
    )
    rows = {}
    for i in range(3):
        part = shard_rows(root, i, 3, 9)
        assert manifest(root, i, 3)["attempts"] == 1
        assert not rows.keys() & part.keys()
        rows |= part
    assert len(rows) == 9 * SAMPLES
    merge = preloaded_cli.run(["job=merge", f"run_dir={root / RUN}"])
    assert merge.returncode == 0, merge.stderr
    assert "3 shard(s) complete | 18 rows" in merge.stderr
    assert (root / RUN / "README.md").exists()


@pytest.mark.slurm
@needs_cluster
def test_merge_runs_as_a_job_depending_on_the_array(three_tasks):
    root, run, merge_job, merge_log = three_tasks
    assert run.wait() == 0, run.output
    wait_until(
        "the dependent merge job", lambda: job_state(merge_job).split("|")[0] in {"COMPLETED", "FAILED"}
    )
    assert job_state(merge_job).startswith("COMPLETED"), merge_log.read_text()
    assert "3 shard(s) complete | 18 rows" in merge_log.read_text()


@pytest.mark.slurm
@needs_cluster
def test_preempted_task_commits_is_requeued_and_resumes(interrupted_array):
    root = interrupted_array["root"]
    m = manifest(root, 0, 3)
    assert m["complete"] and m["attempts"] == 2, interrupted_array["output"]
    log = shard_log(root, 0, 3)
    assert "interrupted: committed" in log and "SIGUSR2, exit status 140" in log
    assert "Requeued job" in log and "attempt 2," in log
    shard_rows(root, 0, 3, 18)


@pytest.mark.slurm
@needs_cluster
def test_hard_requeued_task_resumes_losing_only_uncommitted_rows(interrupted_array):
    root = interrupted_array["root"]
    m = manifest(root, 1, 3)
    assert m["complete"] and m["attempts"] == 2, interrupted_array["output"]
    kept = interrupted_array["requeued_rows"]
    log = shard_log(root, 1, 3)
    resumed = re.search(r"attempt 2, (\d+) rows already committed", log)
    assert resumed is not None, log
    assert int(resumed.group(1)) >= len(kept) > 0
    rows = shard_rows(root, 1, 3, 18)
    assert {k: rows[k] for k in kept} == kept, "rows committed before the requeue are kept as they were"


@pytest.mark.slurm
@needs_cluster
def test_cancelled_task_is_named_by_merge_and_the_same_command_resubmits_only_it(interrupted_array):
    root = interrupted_array["root"]
    assert interrupted_array["status"] != 0, "a cancelled task fails the multirun"
    merge = interrupted_array["merge"]
    assert merge.returncode == 2, merge.stderr
    named = [line for line in merge.stderr.splitlines() if "shard-000" in line]
    assert len(named) == 1 and "shard 2 of 0..2 (shard-00002-of-00003): incomplete" in named[0], merge.stderr
    again = interrupted_array["again"]
    assert again.returncode == 0, again.stdout + again.stderr
    skipped = [line for line in again.stdout.splitlines() if "complete, not launched" in line]
    assert len(skipped) == 2 and "shard.index=2" not in "".join(skipped), again.stdout
    assert manifest(root, 0, 3)["attempts"] == 2 and manifest(root, 1, 3)["attempts"] == 2
    assert manifest(root, 2, 3)["attempts"] == 2
    rows = {}
    for i in range(3):
        rows |= shard_rows(root, i, 3, 18)
    assert len(rows) == 18 * SAMPLES


@pytest.mark.slurm
@needs_cluster
def test_time_limit_signals_before_the_limit_and_the_task_finishes_in_a_later_attempt(time_limit_run):
    root, run = time_limit_run
    assert run.wait(timeout=300) == 0, run.output
    m = manifest(root, 0, 1)
    assert m["complete"] and m["attempts"] >= 2
    log = shard_log(root, 0, 1)
    assert "interrupted: committed" in log and "SIGUSR2, exit status 140" in log, log
    assert "Job has timed out" in log and "Requeued job" in log
    task_logs = "".join(p.read_text() for p in (root / RUN / ".submitit").rglob("*.err"))
    assert "DUE TO TIME LIMIT" not in task_logs, "stopped by the signal, not killed at the limit"
    shard_rows(root, 0, 1, TIME_LIMIT_ROWS)


# Without a cluster: the launcher's choice of watcher and the squeue watcher's reading.


def fake_command(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def test_squeue_watcher_only_when_sacct_says_accounting_is_disabled(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    fake_command(bin_dir, "sacct", 'echo "Slurm accounting storage is disabled" >&2; exit 1')
    assert launchers.accounting_disabled()
    fake_command(bin_dir, "sacct", 'echo "sacct: error: Problem talking to the database" >&2; exit 1')
    assert not launchers.accounting_disabled(), (
        "another sacct failure keeps submitit's watcher and its warnings"
    )
    fake_command(bin_dir, "sacct", "exit 0")
    assert not launchers.accounting_disabled()


def test_squeue_watcher_reads_states_and_sees_ended_tasks(tmp_path, monkeypatch, caplog):
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    fake_command(bin_dir, "squeue", f'echo "$@" > {tmp_path}/args; printf "12_0|RUNNING\\n12_1|CANCELLED\\n"')
    watcher = launchers.SqueueWatcher(delay_s=600)
    for task in ("12_0", "12_1", "12_2"):
        watcher.register_job(task)
    watcher.update()
    assert (tmp_path / "args").read_text().split() == ["-h", "-r", "-t", "all", "-o", "%i|%T", "-j", "12"]
    assert watcher.get_state("12_0", mode="cache") == "RUNNING" and not watcher.is_done("12_0", mode="cache")
    assert watcher.is_done("12_1", mode="cache"), "a cancelled task has ended"
    assert watcher.get_state("12_2", mode="cache") == launchers.GONE and watcher.is_done("12_2", mode="cache")
    # squeue's answer once none of the jobs is known any more: ended, not an error
    fake_command(bin_dir, "squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    watcher.register_job("13_0")
    with caplog.at_level(logging.WARNING):
        watcher.update()
    assert watcher.get_state("13_0", mode="cache") == launchers.GONE and not caplog.records
    # any other failure is reported and decides nothing
    fake_command(
        bin_dir, "squeue", 'echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1'
    )
    watcher.register_job("14_0")
    with caplog.at_level(logging.WARNING):
        watcher.update()
    assert "Unable to contact slurm controller" in caplog.text
    assert watcher.get_state("14_0", mode="cache") == "UNKNOWN"

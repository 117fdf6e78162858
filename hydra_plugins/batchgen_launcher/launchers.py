"""Hydra's submitit launchers (``hydra/launcher=local`` / ``slurm``) that do not launch complete shards.

Before submitting, each job of the sweep is composed and its shard folder checked: a shard whose
manifest says it completed these rows with this config and shard map (``jobs.pipeline.completion``) is
reported as done instead of being submitted, so re-running a multirun submits only what is missing.
Everything else (the executor, the array, requeueing on preemption) is submitit's. When tasks fail, the
launcher waits for all of them, prints each failed task's own error on one line, and exits with status 1.

On a cluster without accounting storage (``sacct`` answers "accounting storage is disabled"), the
Slurm launcher follows its tasks with ``squeue`` instead (``SqueueWatcher``): submitit would warn on
every poll, and never see a task that ended without a result (cancelled) as finished.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict, read_write
from submitit.core import logger as submitit_logger
from submitit.slurm import slurm as submitit_slurm

from jobs.errors import JobExit

log = logging.getLogger(__name__)
EXIT_TASKS_FAILED = 1
EXIT_START_ERROR = 2


def task_error(stderr: str, exception: BaseException) -> str:
    """A failed task's own error on one line: its last ``error:`` line on stderr, else the last line of its
    stderr or of the exception (a traceback's last line names the exception)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if errors:
        return errors[-1]
    if lines:
        return lines[-1]
    text = [ln.strip() for ln in str(exception).splitlines() if ln.strip()]
    return text[-1] if text else type(exception).__name__


class _SkipComplete(submitit_launcher.BaseSubmititLauncher):
    """Launch only the jobs whose shard is not complete; the others return at once."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit the incomplete jobs as one array, report the complete ones as done, in sweep order."""
        files_cache: dict[str, Any] = {}
        complete = [self._is_complete(list(o), files_cache) for o in job_overrides]
        todo = [list(o) for o, done in zip(job_overrides, complete, strict=True) if not done]
        for overrides, done in zip(job_overrides, complete, strict=True):
            if done:
                log.info("complete, not launched: %s", " ".join(overrides))
        if todo:
            self._check_layout(todo[0])
        launched = iter(self._run(todo, initial_job_idx) if todo else [])
        return [
            JobReturn(overrides=list(o), status=JobStatus.COMPLETED) if done else next(launched)
            for o, done in zip(job_overrides, complete, strict=True)
        ]

    def _run(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        """Submit the jobs as one array and wait for all; exit naming each failed task with its error."""
        jobs = self._submit(job_overrides, initial_job_idx)
        results, failed = [], []
        for i, (overrides, job) in enumerate(zip(job_overrides, jobs, strict=True)):
            try:
                results.append(job.results()[0])
            except (
                Exception
            ) as e:  # submitit's UncompletedJobError / FailedJobError: the task's process failed
                try:
                    stderr = job.stderr() or ""
                except OSError:
                    stderr = ""
                failed.append(f"#{initial_job_idx + i} ({' '.join(overrides)}): {task_error(stderr, e)}")
        if failed:
            logs = str(self.params["submitit_folder"]).replace("%j", "<job id>")
            print(
                f"error: {len(failed)} of {len(jobs)} tasks failed (each task's output: {logs}):\n  "
                + "\n  ".join(failed),
                file=sys.stderr,
            )
            raise JobExit(EXIT_TASKS_FAILED)
        return results

    def _submit(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[Any]:
        """submitit's executor for the launcher's parameters, and the jobs of one array (as Hydra's launcher does)."""
        import submitit

        assert self.config is not None
        params = self.params
        specific_init_keys = {"max_num_timeout"}
        init_params = {"folder": params["submitit_folder"]}
        init_params.update({f"{self._EXECUTOR}_{x}": y for x, y in params.items() if x in specific_init_keys})
        init_keys = specific_init_keys | {"submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                x if x in baseparams else f"{self._EXECUTOR}_{x}": y
                for x, y in params.items()
                if x not in init_keys
            }
        )
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append(
                (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        return executor.map_array(self, *zip(*job_params, strict=True))

    def _task_config(self, overrides: list[str]) -> Any:
        """The typed config one job of the sweep runs with."""
        from jobs.cli import to_run_config

        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with read_write(cfg), open_dict(cfg):
            task_cfg = copy.deepcopy(cfg)
            del task_cfg["hydra"]
        return to_run_config(task_cfg)

    def _check_layout(self, overrides: list[str]) -> None:
        """Exit (status 2) before submitting anything when the run directory holds another split of the run."""
        from jobs.config import GenerationJobConfig
        from jobs.errors import JobError
        from jobs.pipeline.shards import check_layout, resolve_shard

        try:
            cfg = self._task_config(overrides)
            count = resolve_shard(cfg.shard).count
        except Exception:  # each task reports its own problems
            return
        if cfg.overwrite or not isinstance(cfg.job, GenerationJobConfig):
            return
        try:
            check_layout(cfg.run_dir, count, overwrite=False)
        except JobError as e:
            print(f"error: {e}", file=sys.stderr)
            raise JobExit(EXIT_START_ERROR) from None

    def _is_complete(self, overrides: list[str], files_cache: dict[str, Any]) -> bool:
        from jobs.pipeline.completion import is_complete

        try:
            return is_complete(self._task_config(overrides), files_cache)
        except Exception as e:  # when in doubt, launch: the job checks again and reports its own errors
            log.debug("could not check %s: %s", overrides, e)
            return False


class LocalLauncher(_SkipComplete, submitit_launcher.LocalLauncher):
    """submitit's local launcher (one process per job on this machine), skipping complete shards."""

    def _submit(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[Any]:
        jobs = super()._submit(job_overrides, initial_job_idx)
        for job in jobs:
            # submitit asks for a result once the task's process has exited, and waits up to 15 s for
            # a result file that a shared file system shows late. Here the task wrote it before exiting,
            # on this machine: a task without one (failed at start, killed) would only delay the report.
            job._results_timeout_s = 0
        return jobs


class SlurmLauncher(_SkipComplete, submitit_launcher.SlurmLauncher):
    """submitit's Slurm launcher (one array task per job), skipping complete shards."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit and wait as submitit does, following the tasks with ``squeue`` when ``sacct`` is disabled."""
        with squeue_watcher_if_no_accounting():
            return super().launch(job_overrides, initial_job_idx)


# sacct's answer on a cluster with AccountingStorageType=accounting_storage/none
ACCOUNTING_DISABLED = "accounting storage is disabled"
# The state of a task that squeue no longer lists (ended more than MinJobAge ago): ended, state unknown.
GONE = "ENDED_NOT_IN_QUEUE"


def accounting_disabled() -> bool:
    """True if ``sacct`` says the cluster keeps no accounting (any other answer or error: False)."""
    try:
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-o", "JobID", "-j", "1"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode != 0 and ACCOUNTING_DISABLED in proc.stderr.lower()


class SqueueWatcher(submitit_slurm.SlurmInfoWatcher):
    """submitit's Slurm watcher asking ``squeue`` (all states, array tasks expanded) instead of ``sacct``.

    squeue lists ended jobs for MinJobAge (300 s by default) with their final state; a registered task
    it no longer lists has ended (state ``GONE``), and submitit reads its result, or reports it failed.
    """

    def _make_command(self) -> list[str] | None:
        to_check = sorted({x.split("_")[0] for x in self._registered - self._finished})
        if not to_check:
            return None
        return ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(to_check)]

    def update(self) -> None:
        """Ask squeue for the unfinished registered jobs; errors other than "no such job" are logged."""
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            submitit_logger.get_logger().warning(f"squeue failed: {e}; status may be inaccurate")
        else:
            if proc.returncode == 0 or "invalid job id" in proc.stderr.lower():
                self._info_dict.update(self.read_info(proc.stdout if proc.returncode == 0 else ""))
            else:
                submitit_logger.get_logger().warning(
                    f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr.strip()}; "
                    "status may be inaccurate"
                )
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        """States from ``<job id>|<state>`` lines; registered unfinished jobs not listed are ``GONE``."""
        if not isinstance(string, str):
            string = string.decode()
        listed: dict[str, dict[str, str]] = {}
        for line in string.splitlines():
            job_id, sep, state = line.strip().partition("|")
            if sep:
                listed[job_id] = {"JobID": job_id, "State": state.strip()}
        gone = {
            job_id: {"JobID": job_id, "State": GONE}
            for job_id in self._registered - self._finished
            if job_id not in listed
        }
        return listed | gone


@contextlib.contextmanager
def squeue_watcher_if_no_accounting() -> Iterator[None]:
    """While launching, let submitit's Slurm jobs use a ``SqueueWatcher`` if the cluster has no accounting."""
    if not accounting_disabled():
        yield
        return
    log.info("Slurm accounting is disabled: following the tasks with squeue instead of sacct")
    previous = submitit_slurm.SlurmJob.watcher
    submitit_slurm.SlurmJob.watcher = SqueueWatcher(delay_s=previous._delay_s)
    try:
        yield
    finally:
        submitit_slurm.SlurmJob.watcher = previous

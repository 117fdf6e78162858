"""Hydra's submitit launchers (``hydra/launcher=local`` / ``slurm``) that do not launch complete shards.

Before submitting, each job of the sweep is composed and its shard folder checked: a shard whose
manifest says it completed these rows with this config and shard map (``jobs.pipeline.completion``) is
reported as done instead of being submitted, so re-running a multirun submits only what is missing.
Everything else (the executor, the array, requeueing on preemption) is submitit's.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import open_dict, read_write

log = logging.getLogger(__name__)


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
        launched = iter(super().launch(todo, initial_job_idx) if todo else [])
        return [
            JobReturn(overrides=list(o), status=JobStatus.COMPLETED) if done else next(launched)
            for o, done in zip(job_overrides, complete, strict=True)
        ]

    def _is_complete(self, overrides: list[str], files_cache: dict[str, Any]) -> bool:
        from jobs.cli import to_run_config
        from jobs.pipeline.completion import is_complete

        assert self.hydra_context is not None and self.config is not None
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with read_write(cfg), open_dict(cfg):
                task_cfg = copy.deepcopy(cfg)
                del task_cfg["hydra"]
            return is_complete(to_run_config(task_cfg), files_cache)
        except Exception as e:  # when in doubt, launch: the job checks again and reports its own errors
            log.debug("could not check %s: %s", overrides, e)
            return False


class LocalLauncher(_SkipComplete, submitit_launcher.LocalLauncher):
    """submitit's local launcher (one process per job on this machine), skipping complete shards."""


class SlurmLauncher(_SkipComplete, submitit_launcher.SlurmLauncher):
    """submitit's Slurm launcher (one array task per job), skipping complete shards."""

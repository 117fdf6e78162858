"""From a composed Hydra config to a job run and a process exit status."""

from __future__ import annotations

import dataclasses
import difflib
import errno
import importlib
import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobs.config import RunConfig, store_schemas
from jobs.errors import Interrupted, JobError, JobExit
from jobs.pipeline.shards import dir_resolver, new_folders, run_folder_resolver, subdir_resolver
from launch import data_parallel
from launch.requeue import hand_over

log = logging.getLogger(__name__)

JOBS = ("synthetic_data", "distill", "score", "openai_batch", "benchmark", "report", "merge")
EXIT_ERROR = 2
# What to pass for a required value left unset (``???`` in conf/; model=hf's model.model keeps the schema's
# empty default, which the generation job refuses itself).
REQUIRED_HINTS = {
    "data.path": "add data.path=<a file, folder or glob; a hub id or dataset folder for data=hf>",
}
# Jobs that read an existing run: run_dir names it (their default run_dir, outputs/<job>/..., never holds one).
RUN_READERS = ("merge", "report")


def unknown_keys(node: object, prefix: str = "") -> list[str]:
    """Keys of ``node`` that its schema does not have (Hydra's ``+key=value`` adds them past the schema),
    each with the closest known key when there is one."""
    found: list[str] = []
    if not isinstance(node, DictConfig | ListConfig) or node._is_none() or node._is_missing():
        return found
    if node._is_interpolation():
        return found
    if isinstance(node, DictConfig):
        schema = OmegaConf.get_type(node)
        known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
        for key in node:
            name = f"{prefix}{key}"
            if known is not None and key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                found.append(name + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            else:
                found += unknown_keys(node._get_node(key), f"{name}.")
    else:
        for i in range(len(node)):
            found += unknown_keys(node._get_node(i), f"{prefix[:-1]}[{i}].")
    return found


def missing_keys(node: object, prefix: str = "") -> list[str]:
    """Keys of ``node`` left ``???`` (required, no default), found without resolving anything."""
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
        return []
    found = []
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            found += missing_keys(child, f"{prefix}{key}.")
        elif child is not None and not child._is_interpolation() and child._is_missing():
            found.append(f"{prefix}{key}")
    return found


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve and instantiate the typed config (the engine's dataclasses validate their values here)."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise JobError(f"unknown config key: {', '.join(unknown)}")
    missing = missing_keys(cfg)
    if missing:
        raise JobError(
            "; ".join(
                f"{key} is not set: {REQUIRED_HINTS.get(key, f'add {key}=... to the command')}"
                for key in missing
            )
        )
    try:
        run_cfg = OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as e:
        raise JobError(f"invalid config: {e}") from e
    if run_cfg.job.name not in JOBS:
        raise JobError(f"job.name: unknown job {run_cfg.job.name!r} (known: {', '.join(JOBS)})")
    return run_cfg


def task_overrides() -> list[str]:
    """The command line's config overrides (none outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def main(cfg: DictConfig) -> int:
    """Run the job ``cfg`` selects; return the exit status (0, 2 for an error at start, 128 + signal when interrupted)."""
    try:
        run_cfg = to_run_config(cfg)
        _check_run_dir_given(run_cfg)
        if data_parallel.workers(run_cfg) > 1:
            return data_parallel.launch(run_cfg, task_overrides())
        importlib.import_module(f"jobs.{run_cfg.job.name}").run(run_cfg)
    except Interrupted as e:
        log.error("%s (%s, exit status %d)", e, e.signal_name, e.exit_code)
        hand_over(e.signum)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("stopped at once by a second signal; committed rows are kept (exit status 130)")
        return 130
    except (JobError, NotImplementedError) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        return _failed(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return _failed(f"cannot write {e.filename or 'the output'}: {e}; free space and run again")
    return 0


def _check_run_dir_given(cfg: RunConfig) -> None:
    """JobError when a job that reads a run (merge, report) was not told which: its default run_dir is its own."""
    if cfg.job.name in RUN_READERS and Path(cfg.run_dir) == Path(cfg.output_root, cfg.job.name, cfg.run_name):
        raise JobError(
            f"job={cfg.job.name} needs the run to read: "
            f"python run.py job={cfg.job.name} run_dir=outputs/<job>/<run> (e.g. outputs/synthetic_data/tiny-chat-tiny-prompts)"
        )


def _failed(message: str) -> int:
    """Report an error on stderr and in the run's ``run.log``; remove the output folder if this start created
    it and left nothing in it but that log. Returns the exit status for errors (2)."""
    print(f"error: {message}", file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), None)
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for handler in files:
        handler.handle(record)
    _remove_new_output_folder(files)
    return EXIT_ERROR


def _remove_new_output_folder(files: list[logging.FileHandler]) -> None:
    """Remove Hydra's output folder (and the folders above it this start created) when it holds only run.log."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir).absolute()
    top = new_folders(folder)
    if top is None or not folder.is_dir() or {p.name for p in folder.iterdir()} - {"run.log"}:
        return
    for handler in files:
        if Path(handler.baseFilename).parent == folder:
            logging.getLogger().removeHandler(handler)
            handler.close()
    (folder / "run.log").unlink(missing_ok=True)
    for path in [folder, *folder.parents]:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return


def exit_status(exit: SystemExit, started: bool) -> int | str | None:
    """The process's exit status. Hydra reports its own errors (the override grammar, a config that does not
    compose or resolve) with status 1 before the job starts: those are errors at start, status 2 like the
    job's own. The job's statuses (``JobExit``) and a crash inside a started job (1) are kept."""
    if not isinstance(exit, JobExit) and exit.code == 1 and not started:
        return EXIT_ERROR
    return exit.code


def register_configs() -> None:
    """The schemas (``jobs.config``) and the resolvers that name a shard's folder, for Hydra."""
    store_schemas()
    if not OmegaConf.has_resolver("shard_dir"):
        OmegaConf.register_new_resolver("shard_dir", dir_resolver)
        OmegaConf.register_new_resolver("shard_subdir", subdir_resolver)
        OmegaConf.register_new_resolver("run_folder", run_folder_resolver)

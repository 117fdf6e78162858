"""Which part of the source this process handles: ``shard.index`` / ``shard.count``, Slurm's variables, the shard map.

Row ``r`` of the source (its position in the concatenation of the source's sorted file list) goes
to shard ``r % count``. The map is therefore a pure function of (index, count, file list); the
manifest records it (with a digest of the file list) so that a resume over other files is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobs.config import ShardConfig
from jobs.errors import JobError
from jobs.pipeline.manifest import CARD_NAME, GENERATIONS_DIR, MANIFEST_NAME, STEPS_DIR

log = logging.getLogger(__name__)

SHARD_RULE = "row_index % count == index"
SHARD_DIR_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")


def shard_subdir(index: int, count: int) -> str:
    """The folder of one shard inside the run directory."""
    return f"shard-{index:05d}-of-{count:05d}"


def shard_path(run_dir: str | Path, shard: ShardConfig) -> Path:
    """Where a resolved shard writes: ``run_dir`` itself when the job is not split."""
    base = Path(run_dir)
    return base if shard.count == 1 else base / shard_subdir(shard.index, shard.count)


def other_layouts(run_dir: str | Path, count: int) -> list[Path]:
    """What in ``run_dir`` belongs to another split than ``count`` shards (1: unsplit): the manifest of an
    unsplit run, shard folders of another count. Folders without a manifest (never started) do not count."""
    run_dir = Path(run_dir)
    found = [run_dir / MANIFEST_NAME] if count > 1 and (run_dir / MANIFEST_NAME).exists() else []
    if run_dir.is_dir():
        for p in sorted(run_dir.iterdir()):
            m = SHARD_DIR_RE.match(p.name)
            if m and int(m.group(2)) != count and (p / MANIFEST_NAME).exists():
                found.append(p)
    return found


def check_layout(run_dir: str | Path, count: int, overwrite: bool) -> None:
    """Refuse to write a split of ``count`` shards (1: an unsplit run) into a ``run_dir`` that holds another:
    the two could never be merged into one dataset. With ``overwrite`` the other split is deleted instead."""
    run_dir = Path(run_dir)
    others = other_layouts(run_dir, count)
    if not others:
        return
    this = "an unsplit run" if count == 1 else f"a split into {count} shards"
    names = ", ".join(p.name for p in others)
    if overwrite:
        log.warning("overwrite=true: deleting the other split in %s (%s)", run_dir, names)
        for p in others:
            if p.name == MANIFEST_NAME:  # the unsplit run's own files; shard folders are its siblings
                for name in (GENERATIONS_DIR, STEPS_DIR):
                    shutil.rmtree(run_dir / name, ignore_errors=True)
                for name in (MANIFEST_NAME, "config.yaml", CARD_NAME):
                    (run_dir / name).unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)
        return
    there = "an unsplit run" if others[0].name == MANIFEST_NAME else "shard folders of another split"
    suffix = "single" if count == 1 else f"{count}-shards"
    raise JobError(
        f"{run_dir} holds {there} ({names}); {this} written beside it could never be merged into one dataset. "
        f"Add run_dir={run_dir}-{suffix} to the command to write this run elsewhere, or overwrite=true to delete "
        f"what is there and start over"
    )


def slurm_shard(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(index, count) from Slurm's array task and task rank variables, or None outside a split Slurm job.

    An array of A tasks, each with T srun tasks, makes A x T shards. Inside a task started by
    submitit (Hydra's submitit launcher), the array is Hydra's sweep, so only the task rank counts.
    """
    array_index, array_count = 0, 1
    if "SLURM_ARRAY_TASK_ID" in env and "SUBMITIT_EXECUTOR" not in env:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        low = int(env.get("SLURM_ARRAY_TASK_MIN", task))
        high = int(env.get("SLURM_ARRAY_TASK_MAX", task))
        array_count = int(env.get("SLURM_ARRAY_TASK_COUNT", high - low + 1))
        if high - low + 1 != array_count:
            raise JobError(
                f"the Slurm array ({low}-{high}, {array_count} tasks) is not a contiguous range of ids: "
                "submit it as --array=0-<N-1>, or pass shard.index and shard.count"
            )
        array_index = task - low
    rank, ranks = int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))
    if array_count == 1 and ranks == 1:
        return None
    return array_index * ranks + rank, array_count * ranks


def resolve_shard(shard: ShardConfig, env: Mapping[str, str] | None = None) -> ShardConfig:
    """``shard`` with unset fields taken from Slurm's variables (else index 0, count 1); JobError if impossible."""
    env = os.environ if env is None else env
    from_env = slurm_shard(env) if shard.index is None or shard.count is None else None
    index, count = from_env or (0, 1)
    resolved = ShardConfig(
        index=index if shard.index is None else shard.index,
        count=count if shard.count is None else shard.count,
    )
    if resolved.count < 1 or not 0 <= resolved.index < resolved.count:
        raise JobError(
            f"shard.index must be in [0, shard.count), got index={resolved.index} count={resolved.count}"
        )
    return resolved


def shard_map(shard: ShardConfig, files: list[tuple[str, int | None]]) -> dict[str, Any]:
    """The record of which rows a shard owns: the rule, index, count and a digest of the source's file list."""
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    return {
        "rule": SHARD_RULE,
        "index": shard.index,
        "count": shard.count,
        "files": len(files),
        "files_sha256": digest,
    }


# Hydra's output folder of this process -> the topmost of its folders that did not exist when Hydra first
# asked for it (None: it existed), so that a failed start can remove what it created (``new_folders``).
_NEW_FOLDERS: dict[Path, Path | None] = {}


def _note_folder(folder: str | Path) -> None:
    """Remember which of ``folder``'s folders do not exist yet (the first time only: Hydra resolves its
    output folder before it creates it)."""
    path = Path(folder).absolute()
    if path in _NEW_FOLDERS:
        return
    top, probe = None, path
    while not probe.exists() and probe != probe.parent:
        top, probe = probe, probe.parent
    _NEW_FOLDERS[path] = top


def new_folders(folder: str | Path) -> Path | None:
    """The topmost folder that this process's start created on the way to ``folder`` (None if none or unknown)."""
    return _NEW_FOLDERS.get(Path(folder).absolute())


def subdir_resolver(index: int | None, count: int | None, *, _root_: Any = None) -> str:
    """Hydra resolver ``${shard_subdir:${shard.index},${shard.count}}``: the shard's folder name, ``.`` if unsplit."""
    try:
        shard = resolve_shard(ShardConfig(index, count))
    except JobError:
        return "."  # the job reports the problem itself, with a clear message
    subdir = "." if shard.count == 1 else shard_subdir(shard.index, shard.count)
    sweep_dir = OmegaConf.select(_root_, "hydra.sweep.dir", default=None) if _root_ is not None else None
    if sweep_dir is not None:
        _note_folder(Path(sweep_dir) / subdir)
    return subdir


def dir_resolver(run_dir: str, index: int | None, count: int | None) -> str:
    """Hydra resolver ``${shard_dir:${run_dir},${shard.index},${shard.count}}``: the shard's output folder."""
    subdir = subdir_resolver(index, count)
    folder = run_dir if subdir == "." else f"{run_dir}/{subdir}"
    _note_folder(folder)
    return folder


def run_folder_resolver(*, _root_: Any) -> str:
    """Hydra resolver ``${run_folder:}``: ``run_dir``, or a scratch folder when it cannot be resolved (a required
    value such as ``data.path`` not set), so that the job itself, not Hydra, reports what is missing."""
    try:
        return str(OmegaConf.select(_root_, "run_dir", throw_on_missing=True))
    except OmegaConfBaseException:
        return str(Path(tempfile.gettempdir()) / f"batchgen-unresolved-{os.getpid()}")

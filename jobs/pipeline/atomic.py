"""Crash-safe file commits: write to a temporary name, fsync, rename, fsync the directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from jobs.pipeline import faults

TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(
    path: Path,
    write: Callable[[BinaryIO], None],
    kind: str | None = None,
    abandon: Callable[[], bool] | None = None,
) -> bool:
    """Create ``path`` atomically: ``write`` fills a temporary file that is fsynced and renamed into place.

    ``kind`` (``"chunk"``, ``"manifest"``) names the commit for fault injection in tests (``jobs.pipeline.faults``).
    ``abandon`` is asked just before the rename: True drops the temporary file and leaves ``path`` as it
    was. Returns whether ``path`` was replaced.
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if kind:
                faults.inject(f"{kind}-write")
            os.fsync(f.fileno())
        if kind:
            faults.inject(f"{kind}-rename")
        if abandon is not None and abandon():
            tmp.unlink()
            return False
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return True


def commit_json(
    path: Path, obj: object, kind: str | None = None, abandon: Callable[[], bool] | None = None
) -> bool:
    """Write ``obj`` as JSON to ``path`` atomically (``commit_file``: ``abandon``, the result)."""
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    return commit_file(path, lambda f: f.write(data), kind, abandon)


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete files left half-written by a crash (``*.tmp``); return them."""
    leftovers = sorted(directory.glob("*" + TMP_SUFFIX)) if directory.is_dir() else []
    for p in leftovers:
        p.unlink()
    return leftovers

"""One run per output directory: an exclusive ``flock`` on ``<out_dir>/.lock``, released on exit or kill."""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobs.errors import JobError

LOCK_NAME = ".lock"


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir`` for this process; JobError naming the holder if another process has it.

    The kernel drops a ``flock`` when its process ends, however it ends (SIGKILL included), so a
    stale lock file never blocks a resume. On a network file system it needs ``flock`` support
    (Lustre: mount with ``-o flock``; NFSv4 emulates it with byte-range locks).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise JobError(
                f"{out_dir} is in use by another run ({holder}); two runs in one directory would write the "
                "same rows. Wait for it to end or stop it, or choose another run_dir=..."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)

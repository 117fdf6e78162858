"""Fault injection for the crash tests: sleep, fail with ENOSPC or send a signal at a named point of a commit.

Off unless ``BATCHGEN_FAULTS`` is set (only the tests set it). The value is a comma-separated list of
``<point>:<action>[@<n>|@<n>+]``:

- points: ``chunk-write``, ``chunk-rename`` (Arrow chunks and step files), ``manifest-write``,
  ``manifest-rename``, ``openai-write``, ``openai-rename`` (job=openai_batch's output.jsonl, then
  errors.jsonl); ``-write`` is after the data is written and before the fsync, ``-rename``
  just before the temporary file is renamed into place.
- actions: ``sleep=<seconds>``, ``enospc`` (raise ``OSError(ENOSPC)``, as a full disk does),
  ``signal=<NAME>`` (``KILL``, ``TERM``, ``INT``... sent to this process).
- ``@n`` fires at the n-th time the point is reached only, ``@n+`` at the n-th and every later
  time; without it, every time.

Example: ``BATCHGEN_FAULTS="chunk-rename:signal=KILL@3,manifest-write:sleep=0.01"``.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "BATCHGEN_FAULTS"
POINTS = ("chunk-write", "chunk-rename", "manifest-write", "manifest-rename")  # of every generation job
_hits: dict[str, int] = {}


def inject(point: str) -> None:
    """Apply the faults ``BATCHGEN_FAULTS`` names for ``point`` (nothing when it is unset)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    hit = _hits[point] = _hits.get(point, 0) + 1
    for item in spec.split(","):
        where, _, rest = item.strip().partition(":")
        action, _, when = rest.partition("@")
        if where != point or not _due(hit, when):
            continue
        name, _, arg = action.partition("=")
        if name == "sleep":
            time.sleep(float(arg))
        elif name == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {point})")
        elif name == "signal":
            os.kill(os.getpid(), signal.Signals["SIG" + arg])
        else:
            raise ValueError(f"{ENV}: unknown action {action!r}")


def _due(hit: int, when: str) -> bool:
    if not when:
        return True
    if when.endswith("+"):
        return hit >= int(when[:-1])
    return hit == int(when)


def reset() -> None:
    """Forget how often each point was reached (a forked test process starts counting afresh)."""
    _hits.clear()

"""Graceful stop: the first stop signal asks the run to stop, a second one stops it at once.

SIGTERM and SIGINT (kill, Ctrl-C, Slurm's cancel or preemption) and SIGUSR1 / SIGUSR2 (what Slurm's
``--signal`` and submitit send before a time limit or on preemption) all stop admitting requests and
commit what has finished; ``launch.requeue`` then hands a preempted task back to its launcher.
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopSignal:
    """Context manager that records the first stop signal; the run loop polls ``requested``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second stop signal ({signal.Signals(signum).name})")
        self.signum = signum

    def __enter__(self) -> StopSignal:
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

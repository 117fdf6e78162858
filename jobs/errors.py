"""Errors the job layer reports to the user as one clear message (no traceback)."""

from __future__ import annotations

import signal


class JobError(Exception):
    """A problem with the configuration, the source, the model or the output directory (found at start, or a failed commit)."""


class JobExit(SystemExit):
    """The process exits with the status the job (or the launcher of its tasks) decided, not Hydra's."""


class Interrupted(Exception):
    """The run stopped on a signal after committing what was finished; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

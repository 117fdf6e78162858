"""After a graceful stop on a preemption or time-limit signal, hand the task back to the launcher that requeues it.

Inside a task started by submitit (Hydra's submitit launcher, local or Slurm), submitit's own handler
for its preemption signal checkpoints the task (the same Hydra job with the same overrides) and
requeues it: ``scontrol requeue`` on Slurm, exit status 144 for the local executor, which restarts
it. The rows are committed by then, so the requeued task resumes where this one stopped.

SIGTERM is not handed over: Slurm sends it on ``scancel`` as well as on preemption, and requeues
preempted jobs itself. A plain ``sbatch`` array requeues on the exit status instead
(``scripts/slurm_array.sbatch``).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def submitit_signal(env: Mapping[str, str]) -> signal.Signals | None:
    """The signal submitit requeues on, when this process is a submitit task."""
    if "SUBMITIT_EXECUTOR" not in env:
        return None
    from submitit import JobEnvironment

    return getattr(signal, "SIG" + JobEnvironment.USR_SIG, None)


def hand_over(signum: int, env: Mapping[str, str] | None = None) -> None:
    """Let submitit requeue this task after a stop by a preemption signal (it exits); return if nothing can."""
    if signum not in PREEMPT_SIGNALS:
        return
    sig = submitit_signal(os.environ if env is None else env)
    handler = signal.getsignal(sig) if sig is not None else None
    if not callable(handler):
        return
    log.warning("handing the task back to submitit to be requeued")
    handler(sig, None)

"""Engine benchmark (workloads W1/W2 of DESIGN.md): a placeholder until it is built."""

from __future__ import annotations

from jobs.config import RunConfig


def run(cfg: RunConfig) -> None:
    """Refuse clearly: the benchmark job does not exist yet."""
    raise NotImplementedError(f"the benchmark job (workload {cfg.job.workload}) is not implemented yet")

"""Synthetic data: prompts from a column or a template over the row's fields -> ``sampling.n`` completions each."""

from __future__ import annotations

from jobs.config import RunConfig
from jobs.generate import run_generation
from jobs.progress import RunStats


def run(cfg: RunConfig) -> RunStats:
    """Run the synthetic_data job."""
    return run_generation(cfg)

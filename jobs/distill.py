"""Distillation: chat messages from a dataset -> responses with the logprob of every chosen token."""

from __future__ import annotations

import dataclasses

from jobs.config import RunConfig
from jobs.generate import run_generation
from jobs.progress import RunStats


def run(cfg: RunConfig) -> RunStats:
    """Run the distill job (logprobs are always recorded)."""
    return run_generation(cfg, params=dataclasses.replace(cfg.job.sampling, logprobs=True))

"""Distillation: chat messages from a dataset -> responses with the logprob of every chosen token."""

from __future__ import annotations

import dataclasses

from jobs.config import RunConfig
from jobs.generate import EngineFactory, load_engine, run_generation
from jobs.progress import RunStats


def run(cfg: RunConfig, make_engine: EngineFactory = load_engine) -> RunStats:
    """Run the distill job (logprobs are always recorded)."""
    return run_generation(
        cfg, params=dataclasses.replace(cfg.job.sampling, logprobs=True), make_engine=make_engine
    )

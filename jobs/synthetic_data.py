"""Synthetic data: prompts from a column or a template over the row's fields -> ``sampling.n`` completions each."""

from __future__ import annotations

from jobs.config import RunConfig
from jobs.generate import EngineFactory, load_engine, run_generation
from jobs.pipeline.progress import RunStats


def run(cfg: RunConfig, make_engine: EngineFactory = load_engine) -> RunStats:
    """Run the synthetic_data job."""
    return run_generation(cfg, make_engine=make_engine)

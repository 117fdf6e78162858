"""Distillation: chat messages from a dataset -> responses with the logprob of every chosen token and, with
``job.sampling.top_logprobs=k``, the teacher's k most likely tokens at each position (docs/distillation.md)."""

from __future__ import annotations

import dataclasses

from engine.sampling_params import SamplingParams
from jobs.config import RunConfig
from jobs.generate import EngineFactory, load_engine, run_generation
from jobs.pipeline.progress import RunStats


def sampling_params(cfg: RunConfig) -> SamplingParams:
    """The configured sampling with logprobs always on."""
    return dataclasses.replace(cfg.job.sampling, logprobs=True)


def run(cfg: RunConfig, make_engine: EngineFactory = load_engine) -> RunStats:
    """Run the distill job (logprobs are always recorded)."""
    return run_generation(cfg, params=sampling_params(cfg), make_engine=make_engine)

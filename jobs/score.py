"""Scoring: a context and its continuations -> the logprob of each continuation (or a text's, for perplexity)."""

from __future__ import annotations

import functools

from engine.sampling_params import MAX_PROMPT_LOGPROBS
from jobs.config import RunConfig
from jobs.errors import JobError
from jobs.generate import EngineFactory, RowKind, load_engine, run_generation
from jobs.pipeline.progress import RunStats
from jobs.pipeline.scoring import SCORE_SCHEMA, ScoreBuilder, ScoreLoop, score_columns, score_params


def row_kind(cfg: RunConfig) -> RowKind:
    """The score job's rows: one engine request per continuation, written as ``SCORE_SCHEMA`` rows."""
    return RowKind(
        columns=lambda c: score_columns(c.job.prompt, c.data),
        builder=lambda c, params, tokenizer: ScoreBuilder(c.job.prompt, c.data, params, tokenizer),
        loop=functools.partial(ScoreLoop, top_logprobs=cfg.job.top_logprobs),
        schema=lambda c, params: SCORE_SCHEMA,
    )


def run(cfg: RunConfig, make_engine: EngineFactory = load_engine) -> RunStats:
    """Run the score job."""
    if not 0 <= cfg.job.top_logprobs <= MAX_PROMPT_LOGPROBS:
        raise JobError(f"job.top_logprobs must be in [0, {MAX_PROMPT_LOGPROBS}], got {cfg.job.top_logprobs}")
    return run_generation(
        cfg, params=score_params(cfg.job.top_logprobs), make_engine=make_engine, kind=row_kind(cfg)
    )

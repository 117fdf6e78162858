"""The settings that decide a run's output rows: what a resumed run must match."""

from __future__ import annotations

import dataclasses
from typing import Any

from engine.sampling_params import SamplingParams
from jobs import tiny_model
from jobs.config import RunConfig


def fingerprint(cfg: RunConfig, params: SamplingParams) -> dict[str, Any]:
    """The settings that decide the output rows (the same for every shard of a run); a resumed run must match them.

    Which rows a shard owns is recorded apart, in the manifest's shard map.
    """
    m = cfg.model
    if m.builtin:
        model = {"builtin": m.builtin, "key": tiny_model.spec_key(tiny_model.BUILTIN_MODELS[m.builtin])}
    else:
        model = {"model": m.model, "tokenizer": m.tokenizer, "revision": m.revision}
    d = cfg.data
    sampling = dataclasses.asdict(params)
    for name in ("prompt_logprobs", "json_schema", "regex", "choice", "grammar"):
        if sampling[name] is None:  # unset: the fingerprint of runs made before the field existed
            del sampling[name]
    if not sampling["top_logprobs"]:  # likewise
        del sampling["top_logprobs"]
    # The score job's settings and the schema column, only when set: runs keep the fingerprints they had
    # before these existed.
    scoring = {
        "context_column": d.context_column,
        "continuations_column": d.continuations_column,
        "json_schema_column": d.json_schema_column,
    }
    extra = {"top_logprobs": cfg.job.top_logprobs} if hasattr(cfg.job, "top_logprobs") else {}
    return {
        "job": cfg.job.name,
        "prompt": dataclasses.asdict(cfg.job.prompt),
        "sampling": sampling,
        "reasoning": dataclasses.asdict(cfg.job.reasoning) if hasattr(cfg.job, "reasoning") else None,
        "accept_models": list(getattr(cfg.job, "accept_models", None) or []),
        "model": model | {"dtype": m.dtype},
        "data": {
            "format": d.format.value,
            "path": d.path,
            "config_name": d.config_name,
            "split": d.split,
            "prompt_column": d.prompt_column,
            "messages_column": d.messages_column,
            "id_column": d.id_column,
        }
        | {k: v for k, v in scoring.items() if v is not None},
        "engine_seed": cfg.engine.seed,
    } | extra

"""OpenAI batch: an OpenAI batch input file -> the run's Arrow rows, then ``output.jsonl`` and ``errors.jsonl``."""

from __future__ import annotations

from typing import Any

from jobs.config import RunConfig
from jobs.errors import JobError
from jobs.generate import EngineFactory, load_engine, model_config, run_generation
from jobs.pipeline.openai_output import OpenAIBatchOutput
from jobs.pipeline.progress import RunStats
from jobs.pipeline.sources import SourceRow


def served_model_name(cfg: RunConfig) -> str:
    """The ``model`` of every response body: ``job.served_model_name``, else ``model.name``."""
    return cfg.job.served_model_name or cfg.model.name


def model_check(cfg: RunConfig):
    """The row check: a request naming a model that is neither served nor accepted is an error row."""
    served = served_model_name(cfg)
    accepted = set(cfg.job.accept_models or ()) | {served}

    def check(row: SourceRow) -> str | None:
        model = row.data.get("model")
        if model is None or "*" in accepted or model in accepted:
            return None
        return (
            f"model {model!r} is not served here (served: {served!r}; "
            "accept it with job.accept_models=[...] or job.accept_models=['*'])"
        )

    return check


def load_tokenizer(cfg: RunConfig) -> Any:
    """The model's tokenizer (for the token texts of logprobs), without loading the model."""
    from engine.model.loader import load_tokenizer as load

    try:
        return load(model_config(cfg))
    except Exception as e:
        raise JobError(f"cannot load the tokenizer of {cfg.model.name!r}: {type(e).__name__}: {e}") from e


def run(cfg: RunConfig, make_engine: EngineFactory = load_engine) -> RunStats:
    """Run the batch (resuming what is committed), then write the OpenAI files once it is complete."""
    if cfg.data.format.value != "openai_batch":
        raise JobError(
            f"job=openai_batch reads OpenAI batch files (data=openai_batch), not data={cfg.data.format.value}"
        )
    output = OpenAIBatchOutput(served_model_name(cfg), lambda: load_tokenizer(cfg))
    return run_generation(cfg, make_engine=make_engine, check_row=model_check(cfg), final_step=output)

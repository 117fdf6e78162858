"""Structured configs (dataclasses) that validate the Hydra tree under ``conf/``.

The engine's own dataclasses (``EngineConfig``, ``SamplingParams``, ``ModelConfig``) are reused as
schemas, so a typo or a wrong type in any override is refused by Hydra before anything loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from engine.config import EngineConfig, ModelConfig
from engine.sampling_params import SamplingParams


class SourceFormat(Enum):
    """Where rows come from: a ``datasets`` dataset, parquet files, JSONL, or an OpenAI batch file."""

    hf = "hf"
    parquet = "parquet"
    jsonl = "jsonl"
    openai_batch = "openai_batch"


@dataclass
class ModelSettings(ModelConfig):
    """The engine's ``ModelConfig`` plus a short name (for the run directory) and an optional built-in model.

    With ``builtin`` set (e.g. ``tiny_chat``), the job materialises that model locally and ``model``
    may stay empty.
    """

    name: str = MISSING
    builtin: str | None = None


@dataclass
class DataConfig:
    """One source of rows and how its columns map to prompts.

    ``path`` is a hub id or local path (``hf``), or a file, directory or glob (the others).
    ``id_column`` unset means the row index is the id. ``limit`` keeps the first rows of the source
    (before sharding), for trial runs. ``context_column`` and ``continuations_column`` are read by
    the score job only: the context (``prompt_column`` when unset) and its continuations (a list of
    texts, or one text); without a continuations column the score job scores the whole text.
    ``json_schema_column`` names a column holding each row's JSON schema (a mapping or its JSON text;
    a null takes ``job.sampling.json_schema``).
    """

    name: str = MISSING
    format: SourceFormat = SourceFormat.hf
    path: str = MISSING
    config_name: str | None = None
    split: str = "train"
    streaming: bool = True
    prompt_column: str | None = "prompt"
    messages_column: str | None = None
    id_column: str | None = None
    limit: int | None = None
    read_batch_rows: int = 1024
    context_column: str | None = None
    continuations_column: str | None = None
    json_schema_column: str | None = None


@dataclass
class PromptConfig:
    """How a row becomes a prompt.

    ``template`` (``str.format`` over the row's fields) replaces the prompt column when set. With
    ``chat_template`` a text prompt becomes a user message (after ``system``, when set) rendered with
    the tokenizer's chat template; without it the text goes to the model as is. A trailing assistant
    message in chat input is dropped (it is what the job regenerates) when ``drop_trailing_assistant``.
    ``chat_template_kwargs`` are passed to the tokenizer's ``apply_chat_template`` (e.g.
    ``{enable_thinking: true}``); a row's own ``chat_template_kwargs`` field (a mapping, or its JSON
    text) is merged over them.
    """

    template: str | None = None
    system: str | None = None
    chat_template: bool = True
    drop_trailing_assistant: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReasoningConfig:
    """Reasoning models: the thinking span between ``start`` and ``end`` (the markers, as text).

    With ``split`` the thinking goes to the ``reasoning`` column and ``completion`` keeps the answer
    after ``end``. ``max_tokens`` (implies ``split``): after that many generated tokens without the
    end marker, the marker's tokens are forced and generation goes on for the answer (not applied to
    a prompt whose chat template closed the thinking already, i.e. that ends with ``end``).
    """

    split: bool = False
    start: str = "<think>"
    end: str = "</think>"
    max_tokens: int | None = None


@dataclass
class GenerationJobConfig:
    """A job that turns each source row into ``sampling.n`` generated rows."""

    name: str = MISSING
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)


@dataclass
class OpenAIBatchJobConfig(GenerationJobConfig):
    """An OpenAI batch input file in, ``output.jsonl`` and ``errors.jsonl`` in OpenAI's batch output format out.

    ``served_model_name`` is the ``model`` of every response body (default: ``model.name``). A
    request whose ``body.model`` is not the served name nor in ``accept_models`` is an error line;
    ``"*"`` in ``accept_models`` accepts any (a request without ``model`` is always accepted).
    """

    served_model_name: str | None = None
    accept_models: list[str] = field(default_factory=lambda: ["*"])


@dataclass
class ScoreJobConfig:
    """A job that scores each source row's continuations given its context (or its whole text).

    ``prompt`` turns the context into the model's input as for generation (raw text by default);
    ``top_logprobs`` > 0 also stores, per continuation token, that many most likely tokens.
    """

    name: str = "score"
    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(chat_template=False))
    top_logprobs: int = 0


@dataclass
class BenchmarkJobConfig:
    """The engine benchmark; what it runs is the ``bench`` group (``bench=w1|w2|w2s|w3|w70b|smoke|job``).

    Of ``engine.*`` it reads only ``tensor_parallel_size`` (the workload sets the rest)."""

    name: str = "benchmark"
    run_name: str = "${oc.select:bench.workload,unnamed}"


@dataclass
class BenchConfig:
    """One benchmark: a workload of ``bench/workloads.py``, our engine modes and transformers' configurations.

    At its speed a full W1 or W2 takes transformers minutes: it runs the first ``transformers_max_requests``
    requests (all when null), each with its own new-token count capped at ``transformers_max_new_tokens``
    (no cap when null), at most min(max_num_seqs, that many) per batch. Our engine runs the whole workload and,
    for the speed-up, exactly those requests at that concurrency. ``transformers: null`` runs every
    configuration it has.
    """

    workload: str = MISSING
    modes: list[str] = field(default_factory=lambda: ["async", "sync"])
    transformers: list[str] | None = None
    transformers_max_requests: int | None = None
    transformers_max_new_tokens: int | None = None
    report: bool = True  # a timing report (timeline PNG, summary) per engine mode, as job=report writes
    # bench=job only (the synthetic_data job against the engine alone, jobs/benchmark_job_path.py):
    num_prompts: int = 4000
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    tokenizer_dir: str = "${oc.env:BATCHGEN_QWEN2_TOKENIZER,../shared/data/qwen2-tokenizer}"
    job_model: str = "qwen2-1.5b"  # or "tiny" (a 2-layer model of the same vocabulary, for a CPU trial)


@dataclass
class ReportJobConfig:
    """The timing report of a run's step records (``run_dir``); the timeline zooms on ``zoom_steps`` steps."""

    name: str = "report"
    zoom_steps: int = 40


@dataclass
class ShardConfig:
    """This process handles the source rows with ``row_index % count == index``.

    Unset (null) fields are taken from Slurm's array or task variables when present, else 0 / 1.
    """

    index: int | None = None
    count: int | None = None


@dataclass
class MergeJobConfig:
    """Check that every shard of ``run_dir`` is complete and present the run as one dataset."""

    name: str = "merge"


@dataclass
class CheckpointConfig:
    """Commit a shard of finished rows every ``rows`` rows or ``seconds`` seconds, whichever comes first."""

    rows: int = 256
    seconds: float = 60.0


@dataclass
class RunnerConfig:
    """Feeding the engine: sequences kept in flight (default 2 x engine.max_num_seqs) and the progress bar."""

    max_in_flight: int | None = None
    progress: bool = True


@dataclass
class RunConfig:
    """The whole run: one option of each group plus where the outputs go."""

    job: Any = MISSING
    model: ModelSettings = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)  # the engine's own defaults, restated nowhere
    data: DataConfig = MISSING
    shard: ShardConfig = field(default_factory=ShardConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    bench: BenchConfig | None = None
    output_root: str = "outputs"
    models_dir: str = MISSING
    run_name: str = MISSING
    run_dir: str = MISSING
    overwrite: bool = False
    # ``auto`` or N: N worker processes, one GPU and one shard each (launch/data_parallel.py); 1 runs here.
    data_parallel: str = "1"


def path_name(path: str) -> str:
    """A folder-safe short name for a path, glob or hub id, for run names.

    ``Qwen/Qwen3-0.6B`` -> ``Qwen3-0.6B``, ``data/*.parquet`` -> ``data``, ``/x/batch.jsonl`` -> ``batch``.
    """
    parts = [p for p in str(path).split("/") if p and not any(c in p for c in "*?[")]
    name = parts[-1] if parts else "data"
    for ext in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(ext)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "data"


def store_schemas() -> None:
    """Register the schemas with Hydra's ConfigStore (the YAML files under ``conf/`` extend them)."""
    if not OmegaConf.has_resolver("path_name"):
        OmegaConf.register_new_resolver("path_name", path_name)
    cs = ConfigStore.instance()
    cs.store(name="run_config_schema", node=RunConfig)
    cs.store(group="job", name="generation_schema", node=GenerationJobConfig)
    cs.store(group="job", name="score_schema", node=ScoreJobConfig)
    cs.store(group="job", name="openai_batch_schema", node=OpenAIBatchJobConfig)
    cs.store(group="job", name="benchmark_schema", node=BenchmarkJobConfig)
    cs.store(group="job", name="report_schema", node=ReportJobConfig)
    cs.store(group="bench", name="bench_schema", node=BenchConfig)
    cs.store(group="job", name="merge_schema", node=MergeJobConfig)

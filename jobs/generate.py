"""A generation job end to end: checks at start, resume, the engine, the run loop, the summary."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
from omegaconf import OmegaConf

from engine.config import ModelConfig
from engine.guided.compiler import load_library
from engine.outputs import RequestError
from engine.sampling_params import SamplingParams
from jobs import tiny_model
from jobs.config import RunConfig
from jobs.errors import Interrupted, JobError
from jobs.pipeline.atomic import commit_file, fsync_dir
from jobs.pipeline.fingerprint import fingerprint
from jobs.pipeline.generation_loop import GenerationLoop
from jobs.pipeline.guided import compiled_ahead, has_json_rows, load_json_schema, with_json_valid
from jobs.pipeline.lock import run_lock
from jobs.pipeline.manifest import CARD_NAME, Manifest, config_hash, finished_run, open_run
from jobs.pipeline.prefetch import Prefetcher
from jobs.pipeline.progress import Progress, RunStats
from jobs.pipeline.prompts import PromptBuilder, RequestSpec, check_columns, check_first_rows, input_columns
from jobs.pipeline.row_keys import CommittedRows
from jobs.pipeline.shards import check_layout, resolve_shard, shard_map, shard_path
from jobs.pipeline.signals import StopSignal
from jobs.pipeline.sources import (
    CHAT_TEMPLATE_KWARGS_COLUMN,
    Source,
    SourceRow,
    open_source,
    select_rows,
    selected_count,
)
from jobs.pipeline.writer import ROW_SCHEMA, OutputSink

log = logging.getLogger(__name__)

EngineFactory = Callable[[RunConfig], Any]


@dataclass(frozen=True)
class RowKind:
    """What a job makes of each source row: the columns it reads, the requests, the loop and the row schema.

    Generation (the default) and the score job share everything else: checks at start, resume,
    shards, the writer and the summary."""

    columns: Callable[[RunConfig], list[str]]
    builder: Callable[[RunConfig, SamplingParams, Any], PromptBuilder]
    loop: Callable[..., GenerationLoop] = GenerationLoop
    schema: Callable[[RunConfig, SamplingParams], pa.Schema] = lambda cfg, params: ROW_SCHEMA


def generation_schema(cfg: RunConfig, params: SamplingParams) -> pa.Schema:
    """The generation rows' schema: with ``json_valid`` when rows can have a JSON schema."""
    return with_json_valid(ROW_SCHEMA) if has_json_rows(cfg, params) else ROW_SCHEMA


GENERATION = RowKind(
    columns=lambda cfg: input_columns(cfg.job.prompt, cfg.data),
    builder=lambda cfg, params, tokenizer: PromptBuilder(
        cfg.job.prompt, cfg.data, params, tokenizer, getattr(cfg.job, "reasoning", None)
    ),
    schema=generation_schema,
)


RowCheck = Callable[[SourceRow], str | None]
"""A job's own check of a source row: the error that makes it an error row, or None."""


class FinalStep(Protocol):
    """Files a job derives from the committed rows once the run is complete (written under the run's lock)."""

    files: tuple[str, ...]
    """Their names in the output folder: removed when a run starts generating (they would be stale)."""

    def write(self, out_dir: Path) -> None:
        """Write the files from the complete run in ``out_dir``."""


EMPTY_MODEL = "model.model is not set: add model.model=<a hub id or a local checkpoint folder>"
CONFIG_NAME = "config.yaml"  # the resolved config of the latest start that passed the checks


def output_dir(cfg: RunConfig) -> Path:
    """Where this process writes: ``run_dir``, or a per-shard subfolder when the job is split."""
    return shard_path(cfg.run_dir, resolve_shard(cfg.shard))


def model_config(cfg: RunConfig) -> ModelConfig:
    """The engine's ModelConfig, with a built-in model materialised under ``models_dir``."""
    m = cfg.model
    path = m.model
    if m.builtin:
        if m.builtin not in tiny_model.BUILTIN_MODELS:
            raise JobError(
                f"model.builtin: unknown built-in model {m.builtin!r} (known: {sorted(tiny_model.BUILTIN_MODELS)})"
            )
        path = str(tiny_model.materialise(m.builtin, cfg.models_dir))
    if not path:
        raise JobError(EMPTY_MODEL)
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    return ModelConfig(**{n: getattr(m, n) for n in names} | {"model": path})


def with_top_logprobs_limit(cfg: RunConfig, params: SamplingParams) -> RunConfig:
    """``cfg`` with ``engine.max_top_logprobs`` raised to the job's ``sampling.top_logprobs`` (a request of
    the source may still ask for more, up to the engine's limit)."""
    if params.top_logprobs <= cfg.engine.max_top_logprobs:
        return cfg
    return dataclasses.replace(
        cfg, engine=dataclasses.replace(cfg.engine, max_top_logprobs=params.top_logprobs)
    )


def load_engine(cfg: RunConfig) -> Any:
    """Load the model and build the engine; JobError naming the model if it cannot be loaded."""
    from engine.build import build_engine

    mcfg = model_config(cfg)
    try:
        engine = build_engine(mcfg, None, cfg.engine)
    except Exception as e:
        raise JobError(
            f"cannot load model {cfg.model.name!r} from {mcfg.model!r}: {type(e).__name__}: {e}"
        ) from e
    log.info("engine: %s", engine.config)
    return engine


def run_generation(
    cfg: RunConfig,
    params: SamplingParams | None = None,
    make_engine: EngineFactory = load_engine,
    kind: RowKind = GENERATION,
    *,
    check_row: RowCheck | None = None,
    final_step: FinalStep | None = None,
) -> RunStats:
    """Generate ``params.n`` rows per source row into ``output_dir(cfg)``, resuming what is committed there
    (or, with another ``kind``, that job's rows).

    ``check_row`` turns rows the job refuses into error rows; ``final_step`` writes its files once the
    run is complete (also when it was complete already: a re-run rewrites them).
    """
    params = load_json_schema(params or cfg.job.sampling)
    cfg = with_top_logprobs_limit(cfg, params)
    if not (cfg.model.builtin or cfg.model.model):
        raise JobError(EMPTY_MODEL)  # before anything is written
    if params.constraint is not None or cfg.data.json_schema_column is not None:
        try:
            load_library()
        except RequestError as e:
            raise JobError(f"constrained generation: {e}") from None
    cfg = dataclasses.replace(cfg, shard=resolve_shard(cfg.shard))
    columns = kind.columns(cfg)
    optional = [] if CHAT_TEMPLATE_KWARGS_COLUMN in columns else [CHAT_TEMPLATE_KWARGS_COLUMN]
    source = open_source(cfg.data, columns + optional)  # a row's own template arguments, where it has them
    if source.num_rows() == 0:
        raise JobError(f"{source.description} has no rows")
    check_columns(columns, source.columns(), source.description)
    out_dir = output_dir(cfg)
    fp = fingerprint(cfg, params)
    digest = config_hash(fp)
    rows_map = shard_map(cfg.shard, source.files())
    done = None if cfg.overwrite else finished_run(out_dir, digest, rows_map, cfg.data.limit)
    if done is not None:
        log.info("%s: %s is complete (%d rows); nothing to do", cfg.job.name, out_dir, done.rows)
        if final_step is not None:
            with run_lock(out_dir):
                final_step.write(out_dir)
        return RunStats(skipped_rows=done.sources, complete=True)
    check_first_rows(select_rows(source, cfg.data.limit, cfg.shard), cfg.data, source.description)
    if not cfg.overwrite:
        check_layout(cfg.run_dir, cfg.shard.count, overwrite=False)  # before anything is written
    with run_lock(out_dir):
        if cfg.overwrite:
            check_layout(cfg.run_dir, cfg.shard.count, overwrite=True)
        return _generate(cfg, params, make_engine, source, out_dir, fp, rows_map, kind, check_row, final_step)


def _generate(
    cfg: RunConfig,
    params: SamplingParams,
    make_engine: EngineFactory,
    source: Source,
    out_dir: Path,
    fp: dict[str, Any],
    rows_map: dict[str, Any],
    kind: RowKind,
    check_row: RowCheck | None = None,
    final_step: FinalStep | None = None,
) -> RunStats:
    """Open (or resume) ``out_dir`` and run the engine over the rows not committed yet; the caller holds the lock."""
    digest = config_hash(fp)
    state = open_run(out_dir, cfg.job.name, fp, cfg.overwrite, rows_map, cfg.data.limit)
    card = Path(cfg.run_dir) / CARD_NAME
    if card.exists():  # it lists the files of the run as it was; this run changes them
        card.unlink(missing_ok=True)
        log.warning("removed %s (written by job=merge): run job=merge again once the run is complete", card)
    if final_step is not None and any((out_dir / name).exists() for name in final_step.files):
        for name in final_step.files:  # from an earlier completion (a lower data.limit, overwrite=true)
            (out_dir / name).unlink(missing_ok=True)
        fsync_dir(out_dir)
    config_text = OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode()
    commit_file(out_dir / CONFIG_NAME, lambda f: f.write(config_text))
    from engine.llm_engine import LLMEngine

    engine = make_engine(cfg)
    if (
        isinstance(engine, LLMEngine) and params.constraint is None
    ):  # the graphs of the job's sampling, up front
        engine.capture_graphs_for(params)
    builder = kind.builder(cfg, params, engine.tokenizer)
    schema = kind.schema(cfg, params)
    sink = OutputSink(out_dir, state.manifest, cfg.checkpoint.rows, cfg.checkpoint.seconds, schema)
    log.info(
        "%s: writing %s (shard.index=%d shard.count=%d, attempt %d, %d rows already committed; pid %d on %s)",
        cfg.job.name,
        out_dir,
        cfg.shard.index,
        cfg.shard.count,
        state.manifest.attempts,
        state.manifest.rows,
        os.getpid(),
        socket.gethostname(),
    )
    stats = RunStats()
    progress = Progress(selected_count(source.num_rows(), cfg.data.limit, cfg.shard), cfg.runner.progress)
    max_in_flight = cfg.runner.max_in_flight or 2 * cfg.engine.max_num_seqs
    start = time.monotonic()
    rows = select_rows(source, cfg.data.limit, cfg.shard)
    specs = _requests(rows, builder, state.done, stats, progress, cfg.data.id_column is not None, check_row)
    requests = Prefetcher(compiled_ahead(engine, specs), max_in_flight)
    # Until the completion marker is written, a stop signal ends the run as interrupted (the rows are
    # committed, a preempted task is requeued); outside this block it would reach the previous handler.
    with StopSignal() as stop:
        try:
            kind.loop(
                engine,
                requests,
                sink,
                digest=digest,
                max_in_flight=max_in_flight,
                stop=stop,
                progress=progress,
                stats=stats,
            ).run()
        finally:
            requests.close()
            progress.close()
        stats.wall_s = time.monotonic() - start
        stats.gpu_busy = engine.summary().gpu_busy
        device = getattr(engine, "device", None)
        stats.device = getattr(device, "type", None)
        if stats.complete:
            stats.complete = _mark_complete(state.manifest, stop)
        if stats.complete and final_step is not None:
            final_step.write(out_dir)
    log.info("%s: %s", cfg.job.name, stats.summary())
    if stop.signum is not None:
        if not stats.complete:
            raise Interrupted(
                stop.signum,
                f"interrupted: committed {state.manifest.rows} rows to {out_dir}; run the same command again to resume",
            )
        log.warning(
            "%s: %s arrived once the run was complete", cfg.job.name, signal.Signals(stop.signum).name
        )
    return stats


def _mark_complete(manifest: Manifest, stop: StopSignal) -> bool:
    """Write the completion marker unless a stop signal comes before it is in place; whether it was written.

    A signal during the write (a slow fsync) abandons it: the run then ends as interrupted, every row
    committed, and the next start finds nothing to generate and marks the run complete."""
    if stop.requested:
        return False
    manifest.complete = True
    if not manifest.save(abandon=lambda: stop.requested):
        manifest.complete = False
    return manifest.complete


def _requests(
    rows: Iterator[SourceRow],
    builder: PromptBuilder,
    done: CommittedRows,
    stats: RunStats,
    progress: Progress,
    check_ids: bool,
    check_row: RowCheck | None = None,
) -> Iterator[RequestSpec]:
    """Requests for the rows not committed yet (committed ones are counted and skipped).

    With ``check_ids`` (ids from a column), a row whose id an earlier row of the shard has is an
    error request, whatever is in flight or committed: the first occurrence is decided by source
    order alone, so a resumed run makes the same choice. ``first_seen`` holds one entry per distinct
    id of the shard; a committed id leaves ``done`` when its row comes by.
    """
    first_seen: dict[str, int] = {}
    for row in rows:
        row_id = builder.row_id(row)
        if check_ids:
            first = first_seen.setdefault(row_id, row.index)
            if first != row.index:
                if row.index in done.duplicate_rows:
                    stats.skipped_rows += 1
                    progress.advance(1)
                else:
                    yield builder.duplicate(row, row_id, first)
                continue
        if row_id in done.ids:
            done.ids.discard(row_id)
            stats.skipped_rows += 1
            progress.advance(1)
            continue
        if check_row is not None and row.error is None:
            row.error = check_row(row)
        yield builder.build(row, row_id)

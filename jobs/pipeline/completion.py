"""Whether a generation job's shard is already complete, decided without a model or a GPU: launchers skip it."""

from __future__ import annotations

import dataclasses
import importlib

from engine.sampling_params import SamplingParams
from jobs.config import GenerationJobConfig, RunConfig
from jobs.errors import JobError
from jobs.pipeline.fingerprint import fingerprint
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest, config_hash, finished_run
from jobs.pipeline.prompts import input_columns
from jobs.pipeline.shards import resolve_shard, shard_map, shard_path
from jobs.pipeline.sources import open_source

SourceFiles = list[tuple[str, int | None]]


def job_params(cfg: RunConfig) -> SamplingParams:
    """The sampling parameters the job runs with: its module's ``sampling_params(cfg)``, else ``job.sampling``."""
    module = importlib.import_module(f"jobs.{cfg.job.name}")
    get = getattr(module, "sampling_params", None)
    return get(cfg) if get is not None else cfg.job.sampling


def is_complete(cfg: RunConfig, files_cache: dict[str, SourceFiles] | None = None) -> bool:
    """True if the shard ``cfg`` names (explicitly) has completed these rows with this config and shard map.

    A shard taken from Slurm's variables is never decided here: the launching process does not see
    the variables its task will. ``files_cache`` keeps the source's file list between calls.
    """
    if not isinstance(cfg.job, GenerationJobConfig) or cfg.overwrite:
        return False
    if cfg.shard.index is None or cfg.shard.count is None:
        return False
    try:
        shard = resolve_shard(cfg.shard)
        out_dir = shard_path(cfg.run_dir, shard)
        manifest = Manifest.load(out_dir / MANIFEST_NAME)
        if manifest is None or not manifest.covers(cfg.data.limit):
            return False
        digest = config_hash(fingerprint(dataclasses.replace(cfg, shard=shard), job_params(cfg)))
        cache = {} if files_cache is None else files_cache
        key = repr(cfg.data)
        if key not in cache:
            cache[key] = open_source(cfg.data, input_columns(cfg.job.prompt, cfg.data)).files()
        return finished_run(out_dir, digest, shard_map(shard, cache[key]), cfg.data.limit) is not None
    except JobError:
        return False  # the task reports it, with its message

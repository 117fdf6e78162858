"""Benchmark job: ``python run.py job=benchmark bench=w1|w2|w2s|w3|w70b|smoke|job [engine.tensor_parallel_size=N]``.

The workload sets the engine's settings; of ``engine.*`` only ``tensor_parallel_size`` is read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from bench.runner import run_benchmark
from bench.workloads import WORKLOADS
from jobs.config import RunConfig
from jobs.errors import JobError

log = logging.getLogger(__name__)


def run(cfg: RunConfig) -> None:
    """Run the benchmark ``cfg.bench`` names and write its table, step records and reports into ``run_dir``."""
    bench = cfg.bench
    if bench is None:
        raise JobError(f"choose a benchmark: bench=<{'|'.join(WORKLOADS)}|job>")
    if bench.workload == "job":
        from jobs.benchmark_job_path import run_job_path

        if bench.job_model not in ("qwen2-1.5b", "tiny"):
            raise JobError(f"bench.job_model: unknown model {bench.job_model!r} (qwen2-1.5b or tiny)")
        run_job_path(cfg)
        return
    if bench.workload not in WORKLOADS:
        known = ", ".join(WORKLOADS)
        raise JobError(
            f"bench.workload: unknown workload {getattr(bench, 'workload', None)!r} (known: {known})"
        )
    bad = set(bench.modes) - {"async", "sync"}
    if bad:
        raise JobError(f"bench.modes: unknown engine mode(s) {sorted(bad)} (use async, sync)")
    out_dir = Path(cfg.run_dir)
    run_benchmark(
        WORKLOADS[bench.workload],
        out_dir,
        modes=tuple(bench.modes),
        transformers=tuple(bench.transformers) if bench.transformers is not None else None,
        transformers_max_requests=bench.transformers_max_requests,
        transformers_max_new_tokens=bench.transformers_max_new_tokens,
        report=bench.report,
        tensor_parallel_size=cfg.engine.tensor_parallel_size,
    )
    log.info("benchmark written to %s", out_dir)

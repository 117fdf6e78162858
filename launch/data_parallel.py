"""Data parallel on one node: ``data_parallel=N|auto`` runs N worker processes, one GPU and one shard each.

The parent process starts ``python run.py <the same overrides> shard.index=i shard.count=N`` for each
worker ``i``, with ``CUDA_VISIBLE_DEVICES`` set to the i-th visible GPU. The workers write the shard
folders of one run directory exactly as a Slurm array does (``<run_dir>/shard-<i>-of-<N>/``), so
resume, completion markers and ``job=merge`` work unchanged. The parent skips shards that are
already complete, logs one combined progress line (rows committed, read from the shards'
manifests), forwards stop signals to the workers, waits for all of them and fails naming the
shards whose worker failed. With ``engine.tensor_parallel_size=T`` each worker gets T GPUs (its
tensor-parallel group) and ``auto`` makes one worker per T visible GPUs.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from jobs.config import GenerationJobConfig, RunConfig, ScoreJobConfig, ShardConfig
from jobs.errors import JobError
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs.pipeline.shards import SHARD_DIR_RE, check_layout, shard_path, slurm_shard
from jobs.pipeline.signals import STOP_SIGNALS

log = logging.getLogger(__name__)

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
PROGRESS_SECONDS = 5.0
EXIT_WORKER_FAILED = 1
# Overrides the parent sets itself for each worker (any given on the command line are replaced).
_OWN_KEYS = ("data_parallel", "shard", "shard.index", "shard.count", "runner.progress")


def visible_devices(env: Mapping[str, str] | None = None, cuda_count: int | None = None) -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` entries (indices, UUIDs or MIG ids).

    ``cuda_count`` is the number of devices CUDA reports (``torch.cuda.device_count()`` when None).
    With ``CUDA_VISIBLE_DEVICES`` set, its first ``cuda_count`` entries; else ``0 .. cuda_count-1``.
    """
    env = os.environ if env is None else env
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count()
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return [str(i) for i in range(cuda_count)]
    entries = [e.strip() for e in spec.split(",")]
    entries = entries[: entries.index("")] if "" in entries else entries
    return entries[:cuda_count]


def worker_count(value: str | int, devices: Sequence[str], per_worker: int = 1) -> int:
    """How many workers ``data_parallel=value`` asks for: ``auto`` is one per ``per_worker`` visible GPUs
    (one tensor-parallel group each; at least 1)."""
    if str(value).strip().lower() == "auto":
        return max(1, len(devices) // per_worker)
    try:
        n = int(str(value))
    except ValueError:
        n = 0
    if n < 1:
        raise JobError(f"data_parallel must be auto or a positive number of workers, got {value!r}")
    return n


def assign_devices(count: int, devices: Sequence[str], per_worker: int = 1) -> list[str | None]:
    """The ``CUDA_VISIBLE_DEVICES`` of each worker: the i-th visible GPU (the i-th group of ``per_worker``
    GPUs with tensor parallelism), or None (inherit) without GPUs."""
    if not devices:
        return [None] * count
    if count * per_worker > len(devices):
        tp = f" x engine.tensor_parallel_size={per_worker}" if per_worker > 1 else ""
        raise JobError(
            f"data_parallel={count}{tp} needs {count * per_worker} GPUs but {len(devices)} are visible "
            f"(CUDA_VISIBLE_DEVICES={','.join(devices)}): use data_parallel=auto or at most "
            f"{len(devices) // per_worker}"
        )
    return [",".join(devices[i * per_worker : (i + 1) * per_worker]) for i in range(count)]


def worker_env(
    base: Mapping[str, str], device: str | None, count: int, cpus: int | None = None
) -> dict[str, str]:
    """A worker's environment: its GPU, and on CPU a share of the cores unless OMP_NUM_THREADS is set."""
    env = dict(base)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    elif "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (cpus or os.cpu_count() or 1) // count))
    return env


def worker_overrides(overrides: Sequence[str], index: int, count: int) -> list[str]:
    """The command line overrides of worker ``index``: the parent's, with the shard and data_parallel set."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _OWN_KEYS]
    return [*kept, "data_parallel=1", f"shard.index={index}", f"shard.count={count}", "runner.progress=false"]


def workers(cfg: RunConfig, env: Mapping[str, str] | None = None) -> int:
    """How many worker processes ``cfg`` asks for (1: run in this process, as without data_parallel)."""
    value = str(cfg.data_parallel).strip()
    if value == "1":
        return 1
    return worker_count(value, visible_devices(env), cfg.engine.tensor_parallel_size)


def _check(cfg: RunConfig, count: int, env: Mapping[str, str]) -> None:
    """JobError if ``cfg`` cannot be split into ``count`` workers in its run directory."""
    if not isinstance(cfg.job, GenerationJobConfig | ScoreJobConfig):
        raise JobError(f"data_parallel applies to generation jobs, not job={cfg.job.name}")
    if cfg.shard.index is not None or cfg.shard.count is not None or slurm_shard(env) is not None:
        raise JobError(
            "data_parallel splits the source itself: leave shard.index and shard.count unset "
            "(and run one data-parallel job per node, outside a split Slurm job)"
        )
    run_dir = Path(cfg.run_dir)
    counts = {int(m.group(2)) for p in run_dir.glob("shard-*") if (m := SHARD_DIR_RE.match(p.name))}
    if counts - {count} and not cfg.overwrite:
        raise JobError(
            f"{run_dir} holds shard folders of another split (shard count {sorted(counts)}): "
            f"resume it with data_parallel={sorted(counts)[0]}, or choose another run_dir, or add overwrite=true"
        )
    if not cfg.overwrite:  # with overwrite, each worker deletes the other split
        check_layout(run_dir, count, overwrite=False)


def _total_source_rows(cfg: RunConfig) -> int | None:
    """The source rows the whole run selects, when the source knows its size."""
    try:
        from jobs.pipeline.prompts import input_columns
        from jobs.pipeline.sources import open_source, selected_count

        source = open_source(cfg.data, input_columns(cfg.job.prompt, cfg.data))
        return selected_count(source.num_rows(), cfg.data.limit, ShardConfig(0, 1))
    except Exception as e:  # progress only: the workers report problems with the source
        log.debug("source size unknown: %s", e)
        return None


@dataclasses.dataclass
class Worker:
    """One worker process and the shard it writes."""

    index: int
    count: int
    folder: Path
    device: str | None
    proc: subprocess.Popen | None = None
    tail: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=20))
    reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"shard {self.index} ({self.folder.name})"

    def committed(self) -> tuple[int, int]:
        """(source rows, rows) committed so far, from the shard's manifest."""
        try:
            m = Manifest.load(self.folder / MANIFEST_NAME)
        except JobError:  # being rewritten
            return 0, 0
        return (0, 0) if m is None else (m.sources, m.rows)


def _echo(worker: Worker, stream: IO[str], out: IO[str]) -> None:
    """Copy a worker's output to ``out``, each line prefixed with its shard, keeping the last lines."""
    for line in stream:
        worker.tail.append(line.rstrip("\n"))
        out.write(f"[shard {worker.index}] {line}")
        out.flush()


def _status(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"


def launch(
    cfg: RunConfig,
    overrides: Sequence[str],
    env: Mapping[str, str] | None = None,
    devices: Sequence[str] | None = None,
    out: IO[str] | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
    command: Callable[[list[str]], list[str]] | None = None,
) -> int:
    """Run ``cfg`` as data-parallel workers; the exit status (0, 1 if a worker failed, 128 + signal if stopped).

    ``overrides`` are the command line's (Hydra's task overrides); each worker gets them plus its shard.
    """
    from jobs.pipeline.completion import is_complete

    env = dict(os.environ if env is None else env)
    devices = visible_devices(env) if devices is None else list(devices)
    tp = cfg.engine.tensor_parallel_size
    count = worker_count(cfg.data_parallel, devices, tp)
    _check(cfg, count, env)
    out = sys.stderr if out is None else out
    command = command or (lambda args: [sys.executable, str(RUN_PY), *args])
    files_cache: dict[str, Any] = {}
    todo: list[Worker] = []
    for index, device in enumerate(assign_devices(count, devices, tp)):
        shard_cfg = dataclasses.replace(cfg, shard=ShardConfig(index, count))
        worker = Worker(index, count, shard_path(cfg.run_dir, shard_cfg.shard), device)
        if is_complete(shard_cfg, files_cache):
            log.info("data parallel: %s complete, not launched", worker.name)
        else:
            todo.append(worker)
    total = _total_source_rows(cfg)
    if not todo:
        log.info("data parallel: all %d shards of %s are complete; nothing to do", count, cfg.run_dir)
        return 0

    stop: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stop.append(signum)
        for w in todo:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        for w in todo:
            args = command(worker_overrides(overrides, w.index, count))
            w.proc = subprocess.Popen(
                args,
                env=worker_env(env, w.device, count * tp),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                # A terminal's Ctrl-C reaches the parent only, which forwards it once. (No parent-death
                # signal: Linux sends it again as the dying parent's threads exit, which would read as a
                # second signal and stop the worker at once; a hard-killed parent's workers finish.)
                start_new_session=True,
            )
            log.info(
                "data parallel: %s: pid %d, CUDA_VISIBLE_DEVICES=%s",
                w.name,
                w.proc.pid,
                w.device if w.device is not None else env.get("CUDA_VISIBLE_DEVICES", "(unset)"),
            )
            if stop:  # a signal arrived while starting: stop this one too
                w.proc.send_signal(stop[0])
        for w in todo:
            assert w.proc is not None and w.proc.stdout is not None
            w.reader = threading.Thread(target=_echo, args=(w, w.proc.stdout, out), daemon=True)
            w.reader.start()
        start = last = time.monotonic()
        shards = [
            Worker(i, count, shard_path(cfg.run_dir, ShardConfig(i, count)), None) for i in range(count)
        ]
        while any(w.proc.poll() is None for w in todo):  # type: ignore[union-attr]
            time.sleep(0.1)
            if time.monotonic() - last >= progress_seconds:
                last = time.monotonic()
                _log_progress(shards, todo, total, last - start)
        for w in todo:
            assert w.reader is not None
            w.reader.join(timeout=10)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    _log_progress(shards, todo, total, time.monotonic() - start)
    failed = [w for w in todo if w.proc.returncode != 0]  # type: ignore[union-attr]
    if stop:
        name = signal.Signals(stop[0]).name
        log.error(
            "data parallel: interrupted by %s, forwarded to the workers (%s); committed rows are kept: "
            "run the same command to resume (exit status %d)",
            name,
            ", ".join(f"{w.name}: {_status(w.proc.returncode)}" for w in todo),  # type: ignore[union-attr]
            128 + stop[0],
        )
        return 128 + stop[0]
    if failed:
        for w in failed:
            log.error(
                "data parallel: %s failed (%s); its last output:\n  %s",
                w.name,
                _status(w.proc.returncode),  # type: ignore[union-attr]
                "\n  ".join(w.tail) or "(none)",
            )
        log.error(
            "data parallel: %d of %d workers failed: %s. Committed rows are kept; run the same command to "
            "finish (complete shards are not run again)",
            len(failed),
            count,
            ", ".join(w.name for w in failed),
        )
        return EXIT_WORKER_FAILED
    log.info(
        "data parallel: %d shards of %s complete; merge with job=merge run_dir=%s",
        count,
        cfg.run_dir,
        cfg.run_dir,
    )
    return 0


def _log_progress(shards: list[Worker], todo: list[Worker], total: int | None, elapsed: float) -> None:
    """One line over all shards: source rows and rows committed, workers running."""
    done = [s.committed() for s in shards]
    sources, rows = sum(d[0] for d in done), sum(d[1] for d in done)
    of = "" if not total else f"/{total} ({100 * sources / total:.0f}%)"
    running = sum(w.proc is not None and w.proc.poll() is None for w in todo)
    log.info(
        "data parallel: %d%s source rows committed, %d rows | %d/%d workers running | %.0f s | per shard: %s",
        sources,
        of,
        rows,
        running,
        len(todo),
        elapsed,
        " ".join(str(d[0]) for d in done),
    )

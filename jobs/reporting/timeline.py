"""Step records read back from Arrow files and laid out on two lanes: CPU preparation and GPU compute.

The GPU lane is rebuilt as a chain from what each record measured: a step's compute starts after the
previous step's compute ended plus the idle gap recorded before it, and the first step's compute
starts when its preparation ends. The CPU lane is each step's ``start_time`` .. ``start_time +
cpu_prep_s``. In async mode the GPU work of step N therefore overlaps the preparation of step N+1.

A resumed run holds one segment per engine run (per attempt): each segment is laid out from its own
first step, and the run clock leaves out the time between segments (the job was not running).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.errors import JobError
from jobs.pipeline.manifest import read_stream

NUMERIC = (
    "step",
    "start_time",
    "cpu_prep_s",
    "gpu_compute_s",
    "gpu_idle_s",
    "num_seqs",
    "prefill_tokens",
    "decode_tokens",
    "kv_blocks_used",
    "kv_blocks_total",
)
REQUIRED = (*NUMERIC, "mode")


@dataclass(slots=True)
class StepColumns:
    """The step records of some files as columns, in file order.

    ``attempt`` is 0 where a file has no such column (the benchmark's files); ``preempted`` is None
    unless every file records it (older step files do not).
    """

    values: dict[str, np.ndarray]
    mode: np.ndarray
    attempt: np.ndarray
    preempted: np.ndarray | None

    def __len__(self) -> int:
        return len(self.mode)


def read_steps(files: list[Path]) -> StepColumns:
    """Read step records from Arrow IPC stream files; JobError naming a file that is unreadable or not step records."""
    parts: list[pa.Table] = []
    for path in files:
        try:
            table = read_stream(Path(path))
        except (OSError, ValueError, pa.ArrowException) as e:
            raise JobError(f"cannot read step records from {path}: {e}") from e
        if table.num_rows == 0:
            continue
        missing = [c for c in REQUIRED if c not in table.column_names]
        if missing:
            raise JobError(f"{path} holds no step records (missing columns: {', '.join(missing)})")
        parts.append(table)
    if not parts:
        return StepColumns({c: np.zeros(0) for c in NUMERIC}, np.zeros(0, dtype=object), np.zeros(0), None)

    def column(name: str, default: float | None = None) -> np.ndarray | None:
        chunks = []
        for t in parts:
            if name in t.column_names:
                chunks.append(t.column(name).to_numpy(zero_copy_only=False))
            elif default is None:
                return None
            else:
                chunks.append(np.full(t.num_rows, default))
        return np.concatenate(chunks)

    values = {c: column(c).astype(np.float64) for c in NUMERIC}
    mode = column("mode").astype(str)
    preempted = column("preempted")
    return StepColumns(
        values, mode, column("attempt", 0), None if preempted is None else preempted.astype(int)
    )


def segment_slices(cols: StepColumns) -> list[slice]:
    """Runs of consecutive records from one engine run: a new one starts where the attempt or the mode
    changes or the step counter does not go up (a new engine)."""
    n = len(cols)
    if n == 0:
        return []
    step = cols.values["step"]
    breaks = (
        (cols.attempt[1:] != cols.attempt[:-1]) | (cols.mode[1:] != cols.mode[:-1]) | (step[1:] <= step[:-1])
    )
    starts = [0, *(np.flatnonzero(breaks) + 1).tolist(), n]
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)]


@dataclass(slots=True)
class Timeline:
    """Each step's CPU and GPU interval on one run clock (seconds from the first step, gaps between
    segments left out), with the step records in the same order."""

    cols: StepColumns
    cpu_start: np.ndarray
    cpu_end: np.ndarray
    gpu_start: np.ndarray
    gpu_end: np.ndarray
    segments: list[slice]
    wall_s: float

    @property
    def num_steps(self) -> int:
        """How many steps the timeline holds."""
        return len(self.cols)

    @property
    def segment_starts(self) -> list[float]:
        """Where each segment (engine run) begins on the run clock."""
        return [float(self.cpu_start[s.start]) for s in self.segments]


def build_timeline(cols: StepColumns) -> Timeline:
    """Lay ``cols`` out on the two lanes, segment by segment in the order they ran."""
    slices = sorted(segment_slices(cols), key=lambda s: cols.values["start_time"][s.start])
    parts: list[tuple[np.ndarray, ...]] = []
    segments: list[slice] = []
    offset = 0.0
    for s in slices:
        v = {k: a[s] for k, a in cols.values.items()}
        cpu_start = v["start_time"] - v["start_time"][0]
        cpu_end = cpu_start + v["cpu_prep_s"]
        gpu_end = cpu_end[0] + np.cumsum(v["gpu_idle_s"] + v["gpu_compute_s"])
        gpu_start = gpu_end - v["gpu_compute_s"]
        parts.append(tuple(a + offset for a in (cpu_start, cpu_end, gpu_start, gpu_end)))
        first = segments[-1].stop if segments else 0
        segments.append(slice(first, first + s.stop - s.start))
        offset += float(max(cpu_end.max(), gpu_end.max()))
    lanes = [np.concatenate(lane) for lane in zip(*parts, strict=True)] if parts else [np.zeros(0)] * 4
    order = np.concatenate([np.arange(s.start, s.stop) for s in slices]) if slices else np.zeros(0, int)
    ordered = StepColumns(
        {k: a[order] for k, a in cols.values.items()},
        cols.mode[order],
        cols.attempt[order],
        None if cols.preempted is None else cols.preempted[order],
    )
    return Timeline(ordered, *lanes, segments, offset)


def merge_intervals(
    start: np.ndarray, end: np.ndarray, min_gap: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted intervals joined where the gap between them is at most ``min_gap`` (overlaps always join)."""
    if len(start) == 0:
        return start, end
    reach = np.maximum.accumulate(end)
    breaks = np.flatnonzero(start[1:] - reach[:-1] > min_gap)
    firsts = np.concatenate([[0], breaks + 1])
    lasts = np.concatenate([breaks, [len(start) - 1]])
    return start[firsts], reach[lasts]


def busy_per_bin(start: np.ndarray, end: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fraction of each bin between consecutive ``edges`` covered by the intervals (sorted by start)."""
    start, end = merge_intervals(start, end)
    done = np.concatenate([[0.0], np.cumsum(end - start)])

    def covered(t: np.ndarray) -> np.ndarray:
        k = np.searchsorted(start, t, side="right") - 1
        inside = np.clip(t - start[np.maximum(k, 0)], 0.0, (end - start)[np.maximum(k, 0)])
        return np.where(k >= 0, done[np.maximum(k, 0)] + inside, 0.0)

    return np.diff(covered(edges)) / np.diff(edges)

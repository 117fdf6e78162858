"""The headline figures of a timeline (GPU busy, idle time, step times, tokens) and their markdown form."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jobs.reporting.timeline import Timeline


@dataclass(slots=True)
class Durations:
    """Mean, median and 99th percentile of a per-step duration, in milliseconds."""

    mean_ms: float
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: np.ndarray) -> Durations:
        """The statistics of ``seconds`` (zeros when empty)."""
        if len(seconds) == 0:
            return cls(0.0, 0.0, 0.0)
        ms = seconds * 1000
        return cls(float(ms.mean()), float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))

    def __str__(self) -> str:
        return f"mean {self.mean_ms:.2f} ms, p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms"


@dataclass
class ReportSummary:
    """What a run's steps add up to; ``gpu_busy`` = total GPU compute / wall time of the steps.

    ``wall_s`` runs from each segment's first preparation to its last compute (or preparation) end,
    summed over segments (engine runs of a resumed job); ``gpu_idle_s`` = ``wall_s`` - ``gpu_compute_s``.
    ``preemptions`` is None when the step records do not carry the count.
    """

    title: str
    modes: list[str]
    steps: int
    segments: int
    wall_s: float
    gpu_compute_s: float
    gpu_idle_s: float
    gpu_busy: float
    steps_per_s: float
    cpu_prep: Durations
    gpu_step: Durations
    prefill_tokens: int
    decode_tokens: int
    mean_num_seqs: float
    max_num_seqs: int
    kv_blocks_total: int
    kv_peak_fraction: float
    preemptions: int | None
    files: list[str] = field(default_factory=list)

    @property
    def busy_label(self) -> str:
        """``GPU busy`` when the steps ran in async mode (CUDA only), else ``device busy`` (the step records
        do not name their device, and on CPU the "compute" lane is the forward pass on the CPU)."""
        return "GPU busy" if "async" in self.modes else "device busy"


def summarize(timeline: Timeline, title: str) -> ReportSummary:
    """The summary of ``timeline``'s steps."""
    v = timeline.cols.values
    wall = timeline.wall_s
    compute = float(v["gpu_compute_s"].sum())
    n = timeline.num_steps
    total = v["kv_blocks_total"]
    kv_fraction = v["kv_blocks_used"] / np.maximum(total, 1)
    preempted = timeline.cols.preempted
    return ReportSummary(
        title=title,
        modes=sorted(set(timeline.cols.mode.tolist())),
        steps=n,
        segments=len(timeline.segment_starts),
        wall_s=wall,
        gpu_compute_s=compute,
        gpu_idle_s=max(wall - compute, 0.0),
        gpu_busy=compute / wall if wall > 0 else 0.0,
        steps_per_s=n / wall if wall > 0 else 0.0,
        cpu_prep=Durations.of(v["cpu_prep_s"]),
        gpu_step=Durations.of(v["gpu_compute_s"]),
        prefill_tokens=int(v["prefill_tokens"].sum()),
        decode_tokens=int(v["decode_tokens"].sum()),
        mean_num_seqs=float(v["num_seqs"].mean()) if n else 0.0,
        max_num_seqs=int(v["num_seqs"].max()) if n else 0,
        kv_blocks_total=int(total.max()) if n else 0,
        kv_peak_fraction=float(kv_fraction.max()) if n else 0.0,
        preemptions=None if preempted is None else int(preempted.sum()),
    )


def to_markdown(s: ReportSummary, images: list[str]) -> str:
    """The summary as a markdown page, with ``images`` (file names next to it) shown below the table."""
    runs = f"{s.segments} engine run{'s' if s.segments != 1 else ''}"
    preemptions = (
        f"{s.preemptions:,}"
        if s.preemptions is not None
        else "unavailable (these step records do not count preemptions)"
    )
    rows = [
        ("mode", ", ".join(s.modes) or "-"),
        ("steps", f"{s.steps:,} ({runs})"),
        ("wall time of the steps", f"{s.wall_s:.3f} s"),
        (s.busy_label, f"{s.gpu_busy:.1%}"),
        ("GPU compute", f"{s.gpu_compute_s:.3f} s"),
        ("GPU idle", f"{s.gpu_idle_s:.3f} s"),
        ("steps/s", f"{s.steps_per_s:.1f}"),
        ("CPU preparation per step", str(s.cpu_prep)),
        ("GPU compute per step", str(s.gpu_step)),
        ("prefill tokens", f"{s.prefill_tokens:,}"),
        ("decode tokens", f"{s.decode_tokens:,}"),
        ("sequences per step", f"mean {s.mean_num_seqs:.1f}, max {s.max_num_seqs}"),
        ("KV cache use", f"peak {s.kv_peak_fraction:.1%} of {s.kv_blocks_total:,} blocks"),
        ("preemptions", preemptions),
    ]
    lines = [f"# Step timing: {s.title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "Wall time runs from the first step's preparation to the last step's end (the time between"]
    lines += ["engine runs of a resumed job is left out); GPU idle = wall time - GPU compute."]
    for name in images:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"

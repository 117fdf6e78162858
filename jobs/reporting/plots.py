"""PNG plots of a timeline with matplotlib (the optional ``plot`` extra), drawn off screen with Agg.

``timeline.png``: CPU preparation and GPU compute on two lanes, for a zoomed window of a few dozen
steps (idle gaps of the GPU marked) and for the whole run, plus the share of time each lane is busy.
``batch_kv.png``: prefill and decode tokens and sequences per step, and KV cache use, over time.
"""

from __future__ import annotations

import importlib.util
from typing import Any, BinaryIO

import numpy as np

from jobs.reporting.summary import ReportSummary
from jobs.reporting.timeline import Timeline, busy_per_bin

CPU_COLOR, GPU_COLOR, IDLE_COLOR = "#4C72B0", "#55A868", "#E8A0A0"
LANES = {"CPU prep": 1.0, "GPU compute": 0.0}
PIXELS = 1000  # whole-run lanes: time bins, each shaded by how busy the lane is in it
MAX_POINTS = 2000  # per-step series longer than this are averaged over time bins


def available() -> bool:
    """Whether matplotlib is installed (``pip install batchgen[plot]``)."""
    return importlib.util.find_spec("matplotlib") is not None


def _figure(rows: int, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1)


def zoom_window(tl: Timeline, steps: int) -> slice:
    """``steps`` consecutive steps from the middle of the longest engine run (past its start-up)."""
    seg = max(tl.segments, key=lambda s: s.stop - s.start)
    length = seg.stop - seg.start
    if length <= steps:
        return seg
    first = seg.start + (length - steps) // 2
    return slice(first, first + steps)


def _lanes(
    ax: Any, cpu: tuple[np.ndarray, np.ndarray], gpu: tuple[np.ndarray, np.ndarray], edges: bool = False
) -> None:
    """Draw intervals on the CPU lane (top) and the GPU lane; ``edges`` outlines each step's bar."""
    style = {"edgecolor": "white", "linewidth": 0.6} if edges else {}
    for (start, end), y, color in (
        (cpu, LANES["CPU prep"], CPU_COLOR),
        (gpu, LANES["GPU compute"], GPU_COLOR),
    ):
        ax.broken_barh(list(zip(start, end - start, strict=True)), (y - 0.35, 0.7), facecolor=color, **style)
    ax.set_yticks(list(LANES.values()), list(LANES))
    ax.set_ylim(-0.5, 2.0)


def _shaded_lanes(ax: Any, tl: Timeline, edges: np.ndarray) -> None:
    """Both lanes over the whole run, each pixel-wide bin shaded by the share of its time the lane is busy."""
    from matplotlib.colors import to_rgb

    lanes = (
        (tl.cpu_start, tl.cpu_end, "CPU prep", CPU_COLOR),
        (tl.gpu_start, tl.gpu_end, "GPU compute", GPU_COLOR),
    )
    for start, end, lane, color in lanes:
        rgba = np.empty((1, len(edges) - 1, 4))
        rgba[..., :3] = to_rgb(color)
        rgba[..., 3] = np.clip(busy_per_bin(start, end, edges), 0.0, 1.0)
        y = LANES[lane]
        ax.imshow(
            rgba, extent=(edges[0], edges[-1], y - 0.35, y + 0.35), aspect="auto", interpolation="nearest"
        )
    ax.set_yticks(list(LANES.values()), list(LANES))
    ax.set_ylim(-0.5, 2.0)


def plot_timeline(tl: Timeline, summary: ReportSummary, out: BinaryIO, zoom_steps: int = 40) -> None:
    """Write the two-lane timeline PNG of ``tl`` to ``out``."""
    fig, (zoom, whole, busy) = _figure(3, 9)
    modes = ", ".join(summary.modes)
    fig.suptitle(
        f"{summary.title} ({modes}): {summary.busy_label} {summary.gpu_busy:.1%} over {summary.steps:,} steps"
    )
    w = zoom_window(tl, zoom_steps)
    _zoom_panel(zoom, tl, w)
    _whole_panel(whole, tl, w)
    _busy_panel(busy, tl, summary.gpu_busy)
    fig.savefig(out, format="png", dpi=100)


def _zoom_panel(ax: Any, tl: Timeline, w: slice) -> None:
    """The steps of ``w`` bar by bar, in milliseconds, with the GPU's idle gaps marked."""
    t0, ms = tl.cpu_start[w.start], 1000.0
    gap_start, gap_end = tl.gpu_end[w.start : w.stop - 1], tl.gpu_start[w.start + 1 : w.stop]
    gaps = gap_end > gap_start
    ax.broken_barh(
        list(zip((gap_start[gaps] - t0) * ms, (gap_end - gap_start)[gaps] * ms, strict=True)),
        (LANES["GPU compute"] - 0.35, 0.7),
        color=IDLE_COLOR,
        label="GPU idle",
    )
    cpu = ((tl.cpu_start[w] - t0) * ms, (tl.cpu_end[w] - t0) * ms)
    _lanes(ax, cpu, ((tl.gpu_start[w] - t0) * ms, (tl.gpu_end[w] - t0) * ms), edges=True)
    step = tl.cols.values["step"]
    ax.set_title(f"steps {int(step[w.start])}..{int(step[w.stop - 1])} (zoomed)")
    ax.set_xlabel(f"ms from {t0:.3f} s")
    ax.legend(loc="upper right", fontsize="small")


def _whole_panel(ax: Any, tl: Timeline, w: slice) -> None:
    """Both lanes over the whole run, the zoomed window outlined, engine restarts dashed."""
    span = max(tl.wall_s, 1e-9)
    _shaded_lanes(ax, tl, np.linspace(0, span, PIXELS + 1))
    ax.axvspan(
        tl.cpu_start[w.start],
        tl.gpu_end[w.stop - 1],
        facecolor="none",
        edgecolor="orange",
        linewidth=2,
        label="zoomed window",
    )
    for x in tl.segment_starts[1:]:
        ax.axvline(x, color="black", linestyle="--", linewidth=1)
    ax.set_title("whole run (shade: share of each pixel's time the lane is busy; dashed: an engine restart)")
    ax.set_xlim(0, span)
    ax.legend(loc="upper right", fontsize="small")


def _busy_panel(ax: Any, tl: Timeline, gpu_busy: float) -> None:
    """The share of time each lane is busy, per time bin (about four steps a bin, at most 300 bins)."""
    span = max(tl.wall_s, 1e-9)
    edges = np.linspace(0, span, int(np.clip(tl.num_steps // 4, 1, 300)) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    for start, end, label, color in (
        (tl.gpu_start, tl.gpu_end, "GPU compute", GPU_COLOR),
        (tl.cpu_start, tl.cpu_end, "CPU prep", CPU_COLOR),
    ):
        ax.plot(centers, 100 * busy_per_bin(start, end, edges), color=color, label=label)
    ax.axhline(100 * gpu_busy, color=GPU_COLOR, linestyle=":", label="GPU busy, whole run")
    ax.set_ylim(0, 105)
    ax.set_xlim(0, span)
    ax.set_ylabel("% of time busy")
    ax.set_xlabel("run time (s)")
    ax.legend(loc="lower right", fontsize="small")


def _binned(x: np.ndarray, ys: list[np.ndarray], span: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-step series as they are, or their means over MAX_POINTS time bins when longer."""
    if len(x) <= MAX_POINTS:
        return x, ys
    idx = np.minimum((x / max(span, 1e-9) * MAX_POINTS).astype(int), MAX_POINTS - 1)
    count = np.bincount(idx, minlength=MAX_POINTS)
    keep = count > 0
    centers = (np.arange(MAX_POINTS) + 0.5) * span / MAX_POINTS
    return centers[keep], [np.bincount(idx, y, MAX_POINTS)[keep] / count[keep] for y in ys]


def plot_batch(tl: Timeline, summary: ReportSummary, out: BinaryIO) -> None:
    """Write the batch composition and KV cache use PNG of ``tl`` to ``out``."""
    fig, (tokens, kv) = _figure(2, 7)
    fig.suptitle(f"{summary.title} ({', '.join(summary.modes)}): batch composition and KV cache")
    v = tl.cols.values
    kv_pct = 100 * v["kv_blocks_used"] / np.maximum(v["kv_blocks_total"], 1)
    x, (prefill, decode, seqs, kv_pct) = _binned(
        tl.cpu_start, [v["prefill_tokens"], v["decode_tokens"], v["num_seqs"], kv_pct], tl.wall_s
    )
    tokens.stackplot(x, decode, prefill, labels=["decode tokens", "prefill tokens"], step="post", alpha=0.8)
    tokens.set_ylabel("tokens per step")
    seq_ax = tokens.twinx()
    seq_ax.plot(x, seqs, color="black", linewidth=1, drawstyle="steps-post", label="sequences")
    seq_ax.set_ylabel("sequences per step")
    seq_ax.set_ylim(0, max(float(seqs.max()) * 1.1, 1))
    handles = tokens.get_legend_handles_labels()
    more = seq_ax.get_legend_handles_labels()
    tokens.legend(handles[0] + more[0], handles[1] + more[1], loc="upper right", fontsize="small")
    kv.plot(x, kv_pct, drawstyle="steps-post", color="#C44E52")
    kv.set_ylabel(f"KV blocks in use (% of {summary.kv_blocks_total:,})")
    kv.set_ylim(0, max(float(kv_pct.max()) * 1.1, 1e-3))
    kv.set_xlabel("run time (s)")
    for ax in (tokens, kv):
        ax.set_xlim(0, max(tl.wall_s, 1e-9))
        for s in tl.segment_starts[1:]:
            ax.axvline(s, color="black", linestyle="--", linewidth=1)
    if len(x) < len(tl.cpu_start):
        tokens.set_title(f"means over {len(x):,} time bins")
    fig.savefig(out, format="png", dpi=100)

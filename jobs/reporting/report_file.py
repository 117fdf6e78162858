"""A timing report (timeline and batch/KV plots, summary) written from any list of step files."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from jobs.errors import JobError
from jobs.pipeline.atomic import commit_file
from jobs.reporting import plots
from jobs.reporting.summary import ReportSummary, summarize, to_markdown
from jobs.reporting.timeline import build_timeline, read_steps

log = logging.getLogger(__name__)

TIMELINE_PNG = "timeline.png"
BATCH_PNG = "batch_kv.png"
SUMMARY_MD = "report.md"
SUMMARY_JSON = "report.json"
ZOOM_STEPS = 40


def write_report(
    step_files: list[Path], out_dir: Path, title: str, prefix: str = "", zoom_steps: int = ZOOM_STEPS
) -> ReportSummary:
    """Write ``<prefix>report.md``/``.json`` and, with matplotlib, ``<prefix>timeline.png`` and
    ``<prefix>batch_kv.png`` for the steps in ``step_files`` into ``out_dir``; return the summary."""
    if zoom_steps < 1:
        raise JobError(f"zoom_steps must be at least 1, got {zoom_steps}")
    out_dir = Path(out_dir)
    timeline = build_timeline(read_steps([Path(p) for p in step_files]))
    if timeline.num_steps == 0:
        raise JobError(f"no step records in {', '.join(map(str, step_files)) or 'an empty list of files'}")
    summary = summarize(timeline, title)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    if plots.available():
        timeline_png, batch_png = prefix + TIMELINE_PNG, prefix + BATCH_PNG
        commit_file(out_dir / timeline_png, lambda f: plots.plot_timeline(timeline, summary, f, zoom_steps))
        commit_file(out_dir / batch_png, lambda f: plots.plot_batch(timeline, summary, f))
        images = [timeline_png, batch_png]
    else:
        log.warning(
            "matplotlib is not installed (pip install batchgen[plot]): writing the summary without plots"
        )
    summary.files = [*images, prefix + SUMMARY_MD, prefix + SUMMARY_JSON]
    markdown = to_markdown(summary, images).encode()
    commit_file(out_dir / (prefix + SUMMARY_MD), lambda f: f.write(markdown))
    data = (json.dumps(dataclasses.asdict(summary), indent=1) + "\n").encode()
    commit_file(out_dir / (prefix + SUMMARY_JSON), lambda f: f.write(data))
    return summary

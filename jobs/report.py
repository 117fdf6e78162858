"""Where the time goes: a timing report (timeline and batch/KV plots, summary) of a run's step records.

``write_report`` works on any list of step files (a run's ``steps/*.arrow``, a benchmark's
``steps_async.arrow``); ``run`` is the ``report`` job: ``python run.py job=report run_dir=outputs/<job>/<run>``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from jobs import report_plots
from jobs.atomic import commit_file
from jobs.config import RunConfig
from jobs.errors import JobError
from jobs.manifest import STEPS_DIR
from jobs.report_summary import ReportSummary, summarize, to_markdown
from jobs.step_timeline import build_timeline, read_steps

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
    if report_plots.available():
        timeline_png, batch_png = prefix + TIMELINE_PNG, prefix + BATCH_PNG
        commit_file(
            out_dir / timeline_png, lambda f: report_plots.plot_timeline(timeline, summary, f, zoom_steps)
        )
        commit_file(out_dir / batch_png, lambda f: report_plots.plot_batch(timeline, summary, f))
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


def step_files(folder: Path) -> list[Path]:
    """The committed step files of a run folder (``steps/*.arrow``), in commit order."""
    return sorted((folder / STEPS_DIR).glob("*.arrow"))


def report_folders(run_dir: Path) -> list[Path]:
    """``run_dir`` if it holds step files, else each subfolder that does (the shards of a split job)."""
    if step_files(run_dir):
        return [run_dir]
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and step_files(p)) if run_dir.is_dir() else []


def run(cfg: RunConfig) -> list[ReportSummary]:
    """The report job: a report of ``run_dir``'s steps written into it (into each shard folder for a split job)."""
    run_dir = Path(cfg.run_dir)
    folders = report_folders(run_dir)
    if not folders:
        raise JobError(
            f"no step records under {run_dir}/{STEPS_DIR}: pass the run directory of a job, "
            "e.g. run_dir=outputs/synthetic_data/tiny-chat-tiny-prompts"
        )
    summaries = []
    for folder in folders:
        title = "/".join(folder.resolve().parts[-2:])
        s = write_report(step_files(folder), folder, title, zoom_steps=cfg.job.zoom_steps)
        log.info(
            "report: %s | %d steps | GPU busy %.1f%% | %.1f steps/s -> %s",
            title,
            s.steps,
            100 * s.gpu_busy,
            s.steps_per_s,
            ", ".join(str(folder / f) for f in s.files),
        )
        summaries.append(s)
    return summaries

"""The ``report`` job: ``python run.py job=report run_dir=outputs/<job>/<run>`` writes a timing report
(timeline and batch/KV plots, summary) of a run's step records into it (see ``jobs.reporting``)."""

from __future__ import annotations

import logging
from pathlib import Path

from jobs.config import RunConfig
from jobs.errors import JobError
from jobs.pipeline.manifest import STEPS_DIR
from jobs.reporting.report_file import write_report
from jobs.reporting.summary import ReportSummary

log = logging.getLogger(__name__)


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
            "report: %s | %d steps | %s %.1f%% | %.1f steps/s -> %s",
            title,
            s.steps,
            s.busy_label,
            100 * s.gpu_busy,
            s.steps_per_s,
            ", ".join(str(folder / f) for f in s.files),
        )
        summaries.append(s)
    return summaries

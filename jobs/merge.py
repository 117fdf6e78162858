"""The merge job: check that every shard of a run is complete and consistent, then present the run as one dataset.

``python run.py job=merge run_dir=outputs/<job>/<run>`` writes ``<run_dir>/README.md``, a dataset
card whose ``configs`` list every committed file of every shard, so that
``datasets.load_dataset("<run_dir>", split="train")`` loads the whole run (and ``"steps"`` its step
records). A missing, incomplete or inconsistent shard stops it with the list of what is wrong, and
nothing is written. ``load_run(run_dir)`` makes the same check and returns the rows memory-mapped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from jobs.config import RunConfig
from jobs.errors import JobError
from jobs.pipeline.atomic import commit_file
from jobs.pipeline.manifest import CARD_NAME, GENERATIONS_DIR, MANIFEST_NAME, STEPS_DIR, Manifest
from jobs.pipeline.shards import SHARD_DIR_RE, shard_subdir

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


@dataclass
class ShardStatus:
    """One expected shard of a run: its folder and manifest, and whether it is complete."""

    index: int
    count: int
    folder: Path
    manifest: Manifest | None

    @property
    def complete(self) -> bool:
        """Its manifest carries the completion marker."""
        return self.manifest is not None and self.manifest.complete

    def describe(self) -> str:
        """``shard 2 of 0..3 (shard-00002-of-00004): complete, 96 rows``, or why it is not."""
        name = f"shard {self.index} of 0..{self.count - 1} ({self.folder.name})"
        m = self.manifest
        if m is None:
            return f"{name}: missing (no manifest: never started, or started in another run_dir)"
        state = "complete" if m.complete else "incomplete"
        return f"{name}: {state}, {m.rows} rows committed in {m.attempts} attempt(s)"


@dataclass
class RunCheck:
    """The shards of a run directory and the problems that keep it from being one dataset."""

    run_dir: Path
    shards: list[ShardStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows committed over all shards."""
        return sum(s.manifest.rows for s in self.shards if s.manifest is not None)

    def files(self, kind: str = GENERATIONS_DIR) -> list[Path]:
        """Committed files of every shard (``generations`` or ``steps``), shard by shard in commit order."""
        out = []
        for s in self.shards:
            if s.manifest is not None:
                entries = s.manifest.chunks if kind == GENERATIONS_DIR else s.manifest.steps
                out += [s.folder / kind / e.file for e in entries]
        return out


def shard_folders(run_dir: Path) -> tuple[int, list[Path]]:
    """The shard count of ``run_dir`` and its expected shard folders (``run_dir`` itself for an unsplit run)."""
    found = sorted(p for p in run_dir.iterdir() if p.is_dir() and SHARD_DIR_RE.match(p.name))
    counts = sorted({int(SHARD_DIR_RE.match(p.name).group(2)) for p in found})
    if len(counts) > 1:
        raise JobError(
            f"{run_dir} holds shard folders of several splits (shard counts {counts}): "
            "move the stale ones away, or choose another run_dir"
        )
    if not counts:
        if not (run_dir / MANIFEST_NAME).exists():
            raise JobError(f"no run in {run_dir}: no {MANIFEST_NAME} and no shard-*-of-* folders")
        return 1, [run_dir]
    if (run_dir / MANIFEST_NAME).exists():
        raise JobError(
            f"{run_dir} holds both an unsplit run ({MANIFEST_NAME}) and shard folders: run the one you want again "
            "with overwrite=true (it deletes the other), or move one of them to another folder"
        )
    count = counts[0]
    return count, [run_dir / shard_subdir(i, count) for i in range(count)]


def check_run(run_dir: str | Path) -> RunCheck:
    """Every shard of ``run_dir``, with a problem for each one missing, incomplete or inconsistent with the others."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise JobError(f"no run directory {run_dir}: pass run_dir=outputs/<job>/<run>")
    count, folders = shard_folders(run_dir)
    check = RunCheck(run_dir)
    for index, folder in enumerate(folders):
        try:
            manifest = Manifest.load(folder / MANIFEST_NAME)
        except JobError as e:
            check.problems.append(str(e))
            manifest = None
        status = ShardStatus(index, count, folder, manifest)
        check.shards.append(status)
        if not status.complete:
            check.problems.append(status.describe())
            continue
        check.problems += _check_shard(status)
    complete = [s.manifest for s in check.shards if s.complete]
    for what, values in [
        ("config hashes", {m.config_hash for m in complete}),
        ("source file lists", {(m.shard_map or {}).get("files_sha256") for m in complete}),
        ("data.limit values", {m.limit for m in complete}),
    ]:
        if len(values) > 1:
            check.problems.append(f"the shards were made with different {what}: {sorted(map(str, values))}")
    return check


def _check_shard(status: ShardStatus) -> list[str]:
    """Problems of one complete shard: a shard map that is not its own, committed files gone."""
    m = status.manifest
    assert m is not None
    problems = []
    smap = m.shard_map or {}
    if (smap.get("index"), smap.get("count")) != (status.index, status.count):
        problems.append(
            f"{status.folder}: its manifest's shard map is shard {smap.get('index')} of {smap.get('count')}"
        )
    for kind, entries in ((GENERATIONS_DIR, m.chunks), (STEPS_DIR, m.steps)):
        for e in entries:
            if not (status.folder / kind / e.file).exists():
                problems.append(f"{status.folder / kind / e.file}: committed but missing")
    return problems


def require_complete(run_dir: str | Path) -> RunCheck:
    """``check_run``, raising JobError with every problem when the run is not one complete dataset."""
    check = check_run(run_dir)
    if check.problems:
        raise JobError(
            f"{check.run_dir} is not complete; not merged:\n  "
            + "\n  ".join(check.problems)
            + "\nRe-run the same command (multirun) to finish it: complete shards are not run again."
        )
    return check


def load_run(run_dir: str | Path) -> datasets.Dataset:
    """All rows of a complete run as one memory-mapped ``datasets.Dataset``; JobError naming what is missing."""
    import datasets
    import pyarrow as pa

    from jobs.pipeline.writer import ROW_SCHEMA

    files = require_complete(run_dir).files()
    if not files:
        return datasets.Dataset(pa.Table.from_pylist([], schema=ROW_SCHEMA))
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])


def dataset_card(check: RunCheck) -> str:
    """A dataset card whose ``configs`` (``default``: the rows, ``steps``: step timing) list the run's committed files."""

    def rel(files: list[Path]) -> list[str]:
        return [f.relative_to(check.run_dir).as_posix() for f in files]

    configs = [
        {"config_name": "default", "data_files": [{"split": "train", "path": rel(check.files())}]},
        {"config_name": "steps", "data_files": [{"split": "train", "path": rel(check.files(STEPS_DIR))}]},
    ]
    configs = [c for c in configs if c["data_files"][0]["path"]]
    first = check.shards[0].manifest
    assert first is not None
    lines = "\n".join(f"- {s.describe()}" for s in check.shards)
    return (
        f"---\n{yaml.safe_dump({'configs': configs}, sort_keys=False)}---\n\n"
        f"# {check.run_dir.name}\n\n"
        f"Output of the `{first.job}` job: {check.rows} rows from {len(check.shards)} complete shard(s), "
        f"config hash `{first.config_hash}`"
        + ("" if first.limit is None else f", the first {first.limit} source rows (`data.limit`)")
        + ".\n\n"
        f"```python\nimport datasets\n\nds = datasets.load_dataset({str(check.run_dir)!r}, split='train')\n```\n\n"
        f"{lines}\n"
    )


def run(cfg: RunConfig) -> RunCheck:
    """The merge job: check ``run_dir`` and write its dataset card; JobError listing missing or incomplete shards."""
    check = require_complete(cfg.run_dir)
    card = dataset_card(check).encode()
    commit_file(check.run_dir / CARD_NAME, lambda f: f.write(card))
    log.info(
        "merge: %s | %d shard(s) complete | %d rows in %d files -> %s",
        check.run_dir,
        len(check.shards),
        check.rows,
        len(check.files()),
        check.run_dir / CARD_NAME,
    )
    return check

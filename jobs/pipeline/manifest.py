"""The checkpoint manifest of a run directory, and recovery of a run's state when it starts again.

Rule for chunk files on disk that the manifest does not list (a crash between a chunk's rename and
the manifest update): such a file is adopted when it reads back completely (ends with the Arrow
end-of-stream marker, every batch readable), carries this run's config hash and holds no id that a
committed chunk already has; otherwise it is deleted and its rows are generated again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from jobs.errors import JobError
from jobs.pipeline.atomic import commit_json, fsync_dir, remove_temporaries
from jobs.pipeline.row_keys import CommittedRows

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"  # the dataset card job=merge writes into a run directory
GENERATIONS_DIR = "generations"
STEPS_DIR = "steps"
ARROW_STREAM_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def config_hash(fingerprint: dict[str, Any]) -> str:
    """A short stable hash of the settings that decide the output rows."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ChunkEntry:
    """One committed chunk file: name (relative to its folder), row count, distinct source rows."""

    file: str
    rows: int
    sources: int = 0


@dataclass
class Manifest:
    """What a run directory holds: the config it was made with, the rows it owns and the committed chunk files.

    ``complete`` is the completion marker: every row selected by ``shard_map`` and ``limit`` (the
    ``data.limit`` of the attempt that finished; None for the whole source) is committed.
    """

    path: Path
    job: str
    config_hash: str
    fingerprint: dict[str, Any]
    chunks: list[ChunkEntry] = field(default_factory=list)
    steps: list[ChunkEntry] = field(default_factory=list)
    attempts: int = 0
    complete: bool = False
    shard_map: dict[str, Any] | None = None
    limit: int | None = None

    @property
    def rows(self) -> int:
        """Rows committed so far."""
        return sum(s.rows for s in self.chunks)

    @property
    def sources(self) -> int:
        """Source rows committed so far."""
        return sum(s.sources for s in self.chunks)

    def covers(self, limit: int | None) -> bool:
        """Whether this run is complete for ``data.limit=limit`` (a complete run covers any smaller limit)."""
        return self.complete and (self.limit is None or (limit is not None and limit <= self.limit))

    @property
    def next_seq(self) -> int:
        """Sequence number for the next chunk or steps file."""
        names = [s.file for s in self.chunks + self.steps]
        return 1 + max((chunk_seq(n) for n in names), default=0)

    def save(self, abandon: Callable[[], bool] | None = None) -> bool:
        """Write the manifest atomically; False if ``abandon`` said so just before the rename (nothing changed)."""
        data = asdict(self)
        data.pop("path")
        return commit_json(self.path, data, kind="manifest", abandon=abandon)

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        """Read a manifest; None if there is none."""
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if "shards" in data:  # the key before output files were called chunks
                data["chunks"] = data.pop("shards")
            data["chunks"] = [ChunkEntry(**s) for s in data["chunks"]]
            data["steps"] = [ChunkEntry(**s) for s in data["steps"]]
            return cls(path=path, **data)
        except (ValueError, KeyError, TypeError) as e:
            raise JobError(f"cannot read {path}: {e}; pass overwrite=true to start over") from e


def chunk_seq(name: str) -> int:
    """The sequence number in a chunk or steps file name such as ``chunk-000012.arrow``."""
    return int(name.rsplit("-", 1)[1].split(".")[0])


def read_stream(path: Path) -> pa.Table:
    """Read an Arrow IPC stream file completely; raise if it is truncated or damaged."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.endswith(ARROW_STREAM_END):
        raise ValueError("no end-of-stream marker (truncated)")
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


def describe_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ between two fingerprints, as ``key: old -> new``."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += describe_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


@dataclass
class ResumeState:
    """A run directory ready to continue: its manifest and the source rows already committed."""

    manifest: Manifest
    done: CommittedRows


def finished_run(out_dir: Path, digest: str, shard_map: dict[str, Any], limit: int | None) -> Manifest | None:
    """The manifest of ``out_dir`` if it completed these rows with this config and shard map (read only), else None."""
    try:
        manifest = Manifest.load(out_dir / MANIFEST_NAME)
    except JobError:
        return None
    if manifest is None or manifest.config_hash != digest or manifest.shard_map != shard_map:
        return None
    return manifest if manifest.covers(limit) and _intact(out_dir, manifest) else None


def _intact(out_dir: Path, manifest: Manifest) -> bool:
    """Whether the chunk and steps files on disk are exactly those the manifest lists (else recovery has work to do)."""
    for name, entries in ((GENERATIONS_DIR, manifest.chunks), (STEPS_DIR, manifest.steps)):
        directory = out_dir / name
        on_disk = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
        if on_disk != {e.file for e in entries}:
            return False
    return True


def open_run(
    out_dir: Path,
    job: str,
    fingerprint: dict[str, Any],
    overwrite: bool,
    shard_map: dict[str, Any] | None = None,
    limit: int | None = None,
) -> ResumeState:
    """Prepare ``out_dir`` for a run: start fresh, or resume after checking the config, the shard map and recovering chunk files."""
    gen_dir, steps_dir = out_dir / GENERATIONS_DIR, out_dir / STEPS_DIR
    manifest_path = out_dir / MANIFEST_NAME
    if overwrite:
        for d in (gen_dir, steps_dir):
            shutil.rmtree(d, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    for d in (gen_dir, steps_dir):
        d.mkdir(parents=True, exist_ok=True)
    digest = config_hash(fingerprint)
    manifest = Manifest.load(manifest_path)
    if manifest is None:
        manifest = Manifest(
            path=manifest_path, job=job, config_hash=digest, fingerprint=fingerprint, shard_map=shard_map
        )
    elif manifest.config_hash != digest:
        changes = describe_changes(manifest.fingerprint, fingerprint)
        raise JobError(
            f"{out_dir} holds outputs made with a different config ({'; '.join(changes) or 'config hash differs'}). "
            "Resuming would mix them: pass overwrite=true to start over, or choose another run_dir=..."
        )
    elif manifest.shard_map != shard_map:
        changes = describe_changes(manifest.shard_map or {}, shard_map or {})
        raise JobError(
            f"{out_dir} holds the rows of a different shard map ({'; '.join(changes)}): the shard count or the "
            "source's files changed. Resuming would lose or repeat rows: pass overwrite=true to start over, "
            "or choose another run_dir=..."
        )
    for d in (gen_dir, steps_dir):
        for p in remove_temporaries(d):
            log.warning("removed half-written %s", p)
    done = CommittedRows()
    manifest.chunks = _recover(gen_dir, manifest.chunks, digest, done)
    manifest.steps = _recover(steps_dir, manifest.steps, None, None)
    if limit is not None and done.last_row >= limit:
        before = "null" if manifest.limit is None else manifest.limit
        raise JobError(
            f"{out_dir} holds committed rows up to source row {done.last_row}, beyond data.limit={limit} "
            f"(the last attempt ran with data.limit={before}): finishing at the lower limit would leave them "
            f"in a run marked complete for {limit}. Run with data.limit={before} (or any limit above "
            f"{done.last_row}) to finish it, or pass overwrite=true to start over with data.limit={limit}"
        )
    manifest.attempts += 1
    manifest.complete = False
    manifest.limit = limit
    manifest.save()
    return ResumeState(manifest, done)


def _recover(
    directory: Path, entries: list[ChunkEntry], digest: str | None, done: CommittedRows | None
) -> list[ChunkEntry]:
    """Check listed files, then adopt or delete unlisted ones; fill ``done`` with committed ids."""
    kept = []
    for entry in entries:
        path = directory / entry.file
        if not path.exists():
            log.warning("%s is listed in the manifest but missing: its rows will be generated again", path)
            continue
        if done is not None:
            try:
                done.update(CommittedRows.of(read_stream(path)))
            except (OSError, ValueError, KeyError, pa.ArrowException) as e:
                raise JobError(
                    f"{path} is listed in {MANIFEST_NAME} but cannot be read ({type(e).__name__}: {e}): "
                    f"delete it and run the same command again, which generates its {entry.rows} rows again"
                ) from e
        kept.append(entry)
    listed = {e.file for e in entries}
    for path in sorted(directory.glob("*.arrow")):
        if path.name in listed:
            continue
        entry = _adoptable(path, digest, done)
        if entry is None:
            path.unlink()
            fsync_dir(directory)
        else:
            log.warning("adopted %s (committed, but the manifest update was lost)", path)
            kept.append(entry)
    return kept


def _adoptable(path: Path, digest: str | None, done: CommittedRows | None) -> ChunkEntry | None:
    """A manifest entry for an unlisted file that is complete and consistent, else None (it is then deleted)."""
    try:
        table = read_stream(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        log.warning("deleting unreadable unlisted file %s: %s", path, e)
        return None
    if done is None:
        return ChunkEntry(path.name, table.num_rows)
    rows = CommittedRows.of(table)
    hashes = set(table.column("config_hash").to_pylist())
    if hashes - {digest} or done.overlaps(rows):
        log.warning("deleting unlisted file %s: other config or rows already committed", path)
        return None
    done.update(rows)
    return ChunkEntry(path.name, table.num_rows, len(rows))

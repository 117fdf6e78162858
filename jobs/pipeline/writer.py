"""Output rows and their commit as Arrow IPC stream chunks, with per-step timing, under a run directory."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from engine.outputs import CompletionOutput
from engine.sampling_params import SamplingParams
from engine.timing import StepRecord
from jobs.errors import JobError
from jobs.pipeline.atomic import commit_file
from jobs.pipeline.field_types import arrow_struct_fields
from jobs.pipeline.guided import json_valid
from jobs.pipeline.manifest import GENERATIONS_DIR, STEPS_DIR, ChunkEntry, Manifest
from jobs.pipeline.prompts import RequestSpec
from jobs.pipeline.reasoning import split_reasoning
from jobs.pipeline.row_keys import custom_id

UNSTORED_SAMPLING_FIELDS = ("prompt_logprobs", "json_schema", "regex", "choice", "grammar")
"""Sampling fields the generation rows do not store (the row schema predates them): the score job's, and
the constraints (in the run's config and fingerprint, or the source's rows; a row of a run with JSON
schemas says whether its completion parsed in ``json_valid``)."""
SAMPLING_FIELDS = tuple(
    f.name for f in dataclasses.fields(SamplingParams) if f.name not in UNSTORED_SAMPLING_FIELDS
)
SAMPLING_TYPE = pa.struct([f for f in arrow_struct_fields(SamplingParams) if f[0] in SAMPLING_FIELDS])

ROW_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("id", pa.string()),
        ("sample_index", pa.int32()),
        ("row_index", pa.int64()),
        ("prompt", pa.string()),
        ("messages", pa.string()),
        ("completion", pa.string()),
        ("reasoning", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("logprobs", pa.list_(pa.float32())),
        ("top_token_ids", pa.list_(pa.list_(pa.int32()))),
        ("top_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("sampling", SAMPLING_TYPE),
        ("error", pa.string()),
        ("config_hash", pa.string()),
    ]
)
TOP_COLUMNS = {"top_token_ids": pa.int32(), "top_logprobs": pa.float32()}
"""Per generated token, the k most likely tokens and their logprobs (``sampling.top_logprobs`` = k; null
when 0). Rows carry them as ``[tokens, k]`` arrays until their commit builds each column at once."""
STEP_SCHEMA = pa.schema(arrow_struct_fields(StepRecord) + [("attempt", pa.int64())])


MAX_PENDING_STEPS = 10_000  # step records buffered at most between commits


def output_rows(spec: RequestSpec, outputs: list[CompletionOutput], digest: str) -> list[dict[str, Any]]:
    """One row per finished sample of a request (the thinking split from the answer when the request asks)."""
    base = _base_row(spec, digest)
    return [
        base
        | _texts(spec, out.text)
        | {
            "json_valid": json_valid(spec.params, out.text) if out.error is None else None,
            "custom_id": custom_id(spec.id, out.index),
            "sample_index": out.index,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "prompt_tokens": len(out.prompt_token_ids) or len(spec.token_ids or ()),
            "completion_tokens": len(out.token_ids),
            "logprobs": out.logprobs,
            "top_token_ids": out.top_token_ids,
            "top_logprobs": out.top_logprobs,
            "error": out.error,
        }
        for out in outputs
    ]


def _texts(spec: RequestSpec, text: str) -> dict[str, Any]:
    if spec.reasoning is None:
        return {"completion": text, "reasoning": None}
    reasoning, answer = split_reasoning(text, *spec.reasoning, spec.prompt)
    return {"completion": answer, "reasoning": reasoning}


def error_rows(spec: RequestSpec, error: str, digest: str) -> list[dict[str, Any]]:
    """One row per sample of a request that could not run, each carrying ``error``."""
    base = _base_row(spec, digest)
    return [
        base
        | {
            "custom_id": custom_id(spec.id, i, None if spec.duplicate_of is None else spec.row_index),
            "sample_index": i,
            "completion": "",
            "reasoning": None,
            "token_ids": [],
            "finish_reason": "error",
            "prompt_tokens": len(spec.token_ids or ()),
            "completion_tokens": 0,
            "logprobs": None,
            "error": error,
        }
        for i in range(spec.params.n)
    ]


def _base_row(spec: RequestSpec, digest: str) -> dict[str, Any]:
    return {
        "id": spec.id,
        "row_index": spec.row_index,
        "prompt": spec.prompt,
        "messages": None if spec.messages is None else json.dumps(spec.messages, ensure_ascii=False),
        "sampling": {name: getattr(spec.params, name) for name in SAMPLING_FIELDS},
        "config_hash": digest,
    }


def rows_table(rows: list[dict[str, Any]], schema: pa.Schema = ROW_SCHEMA) -> pa.Table:
    """The rows as a table of ``schema``; a row that does not fit the schema becomes an error row (never a crash)."""
    top = [
        n
        for n, t in TOP_COLUMNS.items()
        if n in schema.names and schema.field(n).type == pa.list_(pa.list_(t))
    ]
    plain = pa.schema([f for f in schema if f.name not in top])
    try:
        table = pa.Table.from_pylist(rows, schema=plain)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        rows = [_storable(r, plain) for r in rows]  # a row made an error row keeps no top alternatives
        table = pa.Table.from_pylist(rows, schema=plain)
    for name in top:
        table = table.add_column(schema.get_field_index(name), schema.field(name), _top_column(rows, name))
    return table


def _top_column(rows: list[dict[str, Any]], name: str) -> pa.Array:
    """A ``list<list<value>>`` column from each row's ``[tokens, k]`` array (null where a row has none),
    built from flat buffers: no Python object per alternative."""
    arrays = [r.get(name) for r in rows]
    present = [a for a in arrays if a is not None]
    values = np.concatenate([a.ravel() for a in present] or [np.zeros(0)])
    widths = np.concatenate(
        [np.full(len(a), a.shape[1], dtype=np.int64) for a in present] or [np.zeros(0, int)]
    )
    tokens = np.array([0 if a is None else len(a) for a in arrays], dtype=np.int64)
    inner = pa.ListArray.from_arrays(_offsets(widths), pa.array(values, TOP_COLUMNS[name]))
    nulls = pa.array([a is None for a in arrays], pa.bool_())
    return pa.ListArray.from_arrays(_offsets(tokens), inner, mask=nulls)


def _offsets(lengths: np.ndarray) -> pa.Array:
    ends = np.concatenate([[0], np.cumsum(lengths)])
    if ends[-1] > np.iinfo(np.int32).max:  # a list column's offsets are int32
        raise JobError(
            f"a chunk of {ends[-1]} top alternatives is beyond an Arrow list's 2**31: lower checkpoint.rows"
        )
    return pa.array(ends.astype(np.int32), pa.int32())


def _storable(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    try:
        pa.Table.from_pylist([row], schema=schema)
        return row
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        keep = {k: row[k] for k in ("custom_id", "id", "sample_index", "row_index", "config_hash")}
        error = {"error": f"row cannot be stored: {type(e).__name__}: {e}"}
        if "finish_reason" in schema.names:
            error["finish_reason"] = "error"
        return dict.fromkeys(schema.names) | keep | error


def write_stream(path: Path, table: pa.Table) -> None:
    """Commit ``table`` to ``path`` as an Arrow IPC stream (temp file, fsync, rename, fsync the folder)."""

    def write(f: Any) -> None:
        with pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)

    commit_file(path, write, kind="chunk")


class OutputSink:
    """Buffers finished rows and step records; commits them as chunk files, then updates the manifest.

    ``maybe_commit`` hands a due commit to a background thread (the write, the fsyncs and the
    manifest update leave the generation loop's critical path) and returns; one commit is in
    flight at a time, in order, and its error is raised by the next call; rows waiting behind it
    are bounded to twice ``every_rows``. ``commit`` waits for
    the one in flight, then commits what is left, in the caller's thread.
    """

    def __init__(
        self,
        out_dir: Path,
        manifest: Manifest,
        every_rows: int,
        every_seconds: float,
        schema: pa.Schema = ROW_SCHEMA,
    ) -> None:
        self.schema = schema
        self.gen_dir = out_dir / GENERATIONS_DIR
        self.steps_dir = out_dir / STEPS_DIR
        self.manifest = manifest
        self.every_rows = max(1, every_rows)
        self.every_seconds = every_seconds
        self._rows: list[dict[str, Any]] = []
        self._sources = 0
        self._steps: list[dict[str, Any]] = []
        self._last_commit = time.monotonic()
        self._attempt = manifest.attempts
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Queue all rows of one source row (they always land in the same chunk)."""
        self._rows.extend(rows)
        self._sources += 1

    def add_steps(self, records: list[StepRecord]) -> None:
        """Queue per-step timing records."""
        attempt = self._attempt
        self._steps.extend(r.to_dict() | {"attempt": attempt} for r in records)

    def maybe_commit(self) -> bool:
        """Start a commit in the background if enough rows or time have accumulated; True if it did."""
        if self._pending is not None:
            if not self._pending.done() and len(self._rows) < 2 * self.every_rows:
                return False
            self._wait()  # done, or the buffer has grown to twice a commit: wait (bounded memory)
        due = len(self._rows) >= self.every_rows or len(self._steps) >= MAX_PENDING_STEPS
        if not due and time.monotonic() - self._last_commit >= self.every_seconds:
            due = bool(self._rows or self._steps)
        if due:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit")
            self._pending = self._pool.submit(self._write, *self._take())
        return due

    def commit(self) -> None:
        """Wait for the commit in flight, then write what is pending, in this thread."""
        self._wait()
        self._write(*self._take())
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # raises the commit's own error

    def _take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        # Take the buffers first: after a failure in the write, nothing is written twice (uncommitted
        # rows are generated again by the next run).
        self._last_commit = time.monotonic()
        taken = self._rows, self._steps, self._sources
        self._rows, self._steps, self._sources = [], [], 0
        return taken

    def _write(self, rows: list[dict[str, Any]], steps: list[dict[str, Any]], sources: int) -> None:
        """Write ``rows`` and ``steps`` as new chunk files and record them in the manifest."""
        if not rows and not steps:
            return
        seq, committed = self.manifest.next_seq, self.manifest.rows
        try:
            if rows:
                name = f"chunk-{seq:06d}.arrow"
                write_stream(self.gen_dir / name, rows_table(rows, self.schema))
                self.manifest.chunks.append(ChunkEntry(name, len(rows), sources))
            if steps:
                name = f"steps-{seq:06d}.arrow"
                write_stream(self.steps_dir / name, pa.Table.from_pylist(steps, schema=STEP_SCHEMA))
                self.manifest.steps.append(ChunkEntry(name, len(steps)))
            self.manifest.save()
        except OSError as e:  # disk full, quota, I/O error: stop with a message, keep what is committed
            raise JobError(
                f"cannot commit {len(rows)} rows to {self.gen_dir.parent}: {e}. The {committed} rows "
                "committed before are kept; free space and run the same command again to resume"
            ) from e

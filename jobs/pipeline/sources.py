"""Row sources, read as streams: ``datasets`` datasets, parquet files, JSONL and OpenAI batch files.

Every source yields ``SourceRow``s one at a time with their position in the source, knows its
columns (for checks at start) and, when cheap, its row count. Nothing loads the whole dataset.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.guided.compiler import JSON_OBJECT_SCHEMA
from jobs.config import DataConfig, ShardConfig, SourceFormat
from jobs.errors import JobError


@dataclass(slots=True)
class SourceRow:
    """One row of the source: its 0-based position, its fields, per-row sampling overrides, or why it is unreadable."""

    index: int
    data: dict[str, Any]
    sampling: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Source(Protocol):
    """A stream of rows with known columns."""

    description: str

    def columns(self) -> list[str] | None:
        """Column names, or None when the source cannot tell before reading."""

    def num_rows(self) -> int | None:
        """Row count when known without reading the rows."""

    def files(self) -> list[tuple[str, int | None]]:
        """What the rows are read from, in order, with sizes: the input of the shard map."""

    def __iter__(self) -> Iterator[SourceRow]: ...


def open_source(cfg: DataConfig, columns: list[str] | None = None) -> Source:
    """Open the source ``cfg`` describes (reading only ``columns`` where the format allows); JobError if it cannot."""
    if cfg.format is SourceFormat.hf:
        return HFSource(cfg, columns)
    if cfg.format is SourceFormat.parquet:
        return ParquetSource(cfg, columns)
    if cfg.format is SourceFormat.jsonl:
        return JsonlSource(cfg)
    return OpenAIBatchSource(cfg)


def select_rows(source: Source, limit: int | None, shard: ShardConfig) -> Iterator[SourceRow]:
    """The rows this process handles: the first ``limit`` of the source, then ``index % count == shard.index``."""
    for row in source:
        if limit is not None and row.index >= limit:
            return
        if row.index % shard.count == shard.index:
            yield row


def selected_count(total: int | None, limit: int | None, shard: ShardConfig) -> int | None:
    """How many rows ``select_rows`` yields from a source of ``total`` rows (None if unknown)."""
    if total is None:
        return None
    n = total if limit is None else min(total, limit)
    return max(0, (n - shard.index + shard.count - 1) // shard.count)


def resolve_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files named by ``path``: a file, a directory (searched for ``suffixes``) or a glob; sorted."""
    if glob.has_magic(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.name.endswith(suffixes))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise JobError(f"data.path: no such file or directory: {path!r}")
    if not files:
        raise JobError(f"data.path: no {'/'.join(suffixes)} files match {path!r}")
    return files


def file_sizes(files: list[str]) -> list[tuple[str, int | None]]:
    """Each file with its size in bytes."""
    return [(f, os.path.getsize(f)) for f in files]


class HFSource:
    """A Hugging Face ``datasets`` dataset: hub id, local dataset folder or ``save_to_disk`` folder."""

    def __init__(self, cfg: DataConfig, columns: list[str] | None) -> None:
        import datasets

        self.description = f"dataset {cfg.path!r} split {cfg.split!r}"
        try:
            if any(os.path.isfile(os.path.join(cfg.path, f)) for f in ("state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(cfg.path)
                ds = ds[cfg.split] if isinstance(ds, datasets.DatasetDict) else ds
            else:
                ds = datasets.load_dataset(
                    cfg.path, cfg.config_name, split=cfg.split, streaming=cfg.streaming
                )
        except Exception as e:
            raise JobError(f"cannot open {self.description}: {type(e).__name__}: {e}") from e
        self._total = self._known_length(ds, cfg.split)
        if cfg.streaming and isinstance(ds, datasets.Dataset):
            ds = ds.to_iterable_dataset()  # memory-mapped already; iterate it as a stream too
        self._columns = ds.column_names
        if columns is not None and self._columns is not None:
            ds = ds.select_columns(
                [c for c in columns if c in self._columns]
            )  # a missing one is refused later
        self._ds = ds
        self._name = f"{cfg.path}:{cfg.config_name or ''}:{cfg.split}"

    @staticmethod
    def _known_length(ds: Any, split: str) -> int | None:
        try:
            return len(ds)
        except TypeError:
            splits = ds.info.splits or {}
            info = splits.get(split)
            return info.num_examples if info is not None and info.num_examples else None

    def columns(self) -> list[str] | None:
        """Column names from the dataset's features (None if a streamed dataset does not declare them)."""
        if self._columns is None:
            first = next(iter(self._ds), None)
            self._columns = list(first) if first is not None else []
        return list(self._columns)

    def num_rows(self) -> int | None:
        """Row count from the dataset (or its split info when streamed)."""
        return self._total

    def files(self) -> list[tuple[str, int | None]]:
        """The dataset (path, config, split) with its row count when known: its files are the library's business."""
        return [(self._name, self._total)]

    def __iter__(self) -> Iterator[SourceRow]:
        for i, row in enumerate(self._ds):
            yield SourceRow(i, row)


class ParquetSource:
    """Parquet files (a file, a folder or a glob), read in record batches of ``read_batch_rows``."""

    def __init__(self, cfg: DataConfig, columns: list[str] | None) -> None:
        import pyarrow.parquet as pq

        self.description = f"parquet {cfg.path!r}"
        self._files = resolve_files(cfg.path, (".parquet",))
        self._batch_rows = cfg.read_batch_rows
        self._total = 0
        self._columns: list[str] | None = None
        lacking: dict[str, list[str]] = {}
        for f in self._files:
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as e:
                raise JobError(f"cannot read parquet file {f!r}: {type(e).__name__}: {e}") from e
            names = meta.schema.to_arrow_schema().names
            self._columns = names if self._columns is None else [c for c in self._columns if c in names]
            self._total += meta.num_rows
            for c in columns or ():
                if c not in names and c != CHAT_TEMPLATE_KWARGS_COLUMN:  # optional: where a file has it
                    lacking.setdefault(c, []).append(f)
        for c, files in lacking.items():
            if len(files) < len(self._files):
                raise JobError(
                    f"column {c!r} is missing from {len(files)} of {len(self._files)} parquet files "
                    f"({', '.join(map(repr, files[:5]))}{', ...' if len(files) > 5 else ''}): "
                    "their rows would have no value; fix the files or select the others with data.path"
                )
        wanted = self._columns if columns is None else columns
        self._read_columns = [c for c in wanted if c in (self._columns or [])]

    def columns(self) -> list[str] | None:
        """Columns present in every file."""
        return list(self._columns or [])

    def num_rows(self) -> int | None:
        """Total rows from the files' metadata."""
        return self._total

    def files(self) -> list[tuple[str, int | None]]:
        """The parquet files, sorted, with their sizes."""
        return file_sizes(self._files)

    def __iter__(self) -> Iterator[SourceRow]:
        import pyarrow.parquet as pq

        index = 0
        for f in self._files:
            with pq.ParquetFile(f) as pf:
                for batch in pf.iter_batches(batch_size=self._batch_rows, columns=self._read_columns):
                    for row in batch.to_pylist():
                        yield SourceRow(index, row)
                        index += 1


COUNT_LINES_MAX_BYTES = 256 << 20


class JsonlSource:
    """JSON Lines files (optionally gzipped), one object per line; a bad line becomes a row with an error."""

    suffixes = (".jsonl", ".json", ".jsonl.gz", ".json.gz")

    def __init__(self, cfg: DataConfig) -> None:
        self.description = f"jsonl {cfg.path!r}"
        self._files = resolve_files(cfg.path, self.suffixes)
        self._first: dict[str, Any] | None = None
        for f in self._files:
            try:
                with self._open(f) as fh:
                    line = next((ln for ln in fh if ln.strip()), None)
            except (OSError, EOFError) as e:
                raise JobError(f"cannot read {f!r}: {type(e).__name__}: {e}") from e
            if self._first is None and line is not None:
                try:
                    first = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise JobError(f"{f!r} is not JSON Lines (first line: {e})") from e
                self._first = first if isinstance(first, dict) else {}

    @staticmethod
    def _open(path: str) -> io.BufferedIOBase:
        """The file as bytes: each line is decoded on its own, so invalid UTF-8 spoils only its row."""
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")

    def columns(self) -> list[str] | None:
        """Keys of the first record (later records may lack some; those rows get an error)."""
        return list(self._first or {})

    def files(self) -> list[tuple[str, int | None]]:
        """The JSON Lines files, sorted, with their sizes."""
        return file_sizes(self._files)

    def num_rows(self) -> int | None:
        """Non-blank lines, counted when the files are plain text and small; None otherwise."""
        if (
            any(f.endswith(".gz") for f in self._files)
            or sum(map(os.path.getsize, self._files)) > COUNT_LINES_MAX_BYTES
        ):
            return None
        total = 0
        for f in self._files:
            with open(f, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
        return total

    def __iter__(self) -> Iterator[SourceRow]:
        index = 0
        for f in self._files:
            with self._open(f) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    yield self._parse(index, line, f"{f}:{lineno}")
                    index += 1

    def _parse(self, index: int, line: bytes, where: str) -> SourceRow:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            return SourceRow(index, {}, error=f"invalid UTF-8 at {where}: {e}")
        except json.JSONDecodeError as e:
            return SourceRow(index, {}, error=f"invalid JSON at {where}: {e}")
        if not isinstance(obj, dict):
            return SourceRow(index, {}, error=f"expected a JSON object at {where}, got {type(obj).__name__}")
        return SourceRow(index, obj)


# OpenAI request body fields -> SamplingParams fields.
OPENAI_SAMPLING_FIELDS = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "n": "n",
    "logprobs": "logprobs",
    "top_logprobs": "top_logprobs",
}
OPENAI_IGNORED_FIELDS = {
    "model",
    "messages",
    "prompt",
    "user",
    "stream",
    "stream_options",
    "metadata",
    "store",
    "chat_template_kwargs",
}
# Fields accepted only with the value that asks for nothing (the default).
OPENAI_NEUTRAL_FIELDS = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "echo": False,
    "logit_bias": {},
    "suffix": "",
}
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
OPENAI_URLS = (CHAT_URL, COMPLETIONS_URL)
# Row fields of an OpenAI batch source (and the optional per-row template arguments of any source).
OPENAI_COLUMNS = ["custom_id", "messages", "prompt", "endpoint", "model", "chat_template_kwargs"]
CHAT_TEMPLATE_KWARGS_COLUMN = "chat_template_kwargs"


def response_format_schema(value: Any) -> Any:
    """The JSON schema an OpenAI ``response_format`` asks for (None for plain text); ValueError if unsupported.

    ``{"type": "json_schema", "json_schema": {"schema": {...}, ...}}`` gives its schema (``name``,
    ``strict`` and ``description`` are accepted and unused: the schema is always enforced);
    ``{"type": "json_object"}`` any JSON object."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format json_schema has no 'schema' object")
        return schema
    raise ValueError(
        f"unsupported response_format {value!r} (supported types: text, json_object, json_schema)"
    )


class OpenAIBatchSource(JsonlSource):
    """An OpenAI batch input file: ``{"custom_id", "method", "url", "body": {messages | prompt, sampling...}}``.

    Rows come out as ``{"custom_id", "messages", "prompt", "endpoint", "model", "chat_template_kwargs"}``
    with the body's sampling fields as per-row overrides. ``url`` is ``/v1/chat/completions`` (the body
    has ``messages``) or ``/v1/completions`` (``prompt``: raw text, no chat template); without a url the
    body decides. Another url, a method other than POST, or a body field the engine cannot honour makes
    that row an error.
    """

    def columns(self) -> list[str] | None:
        """The normalised columns."""
        return list(OPENAI_COLUMNS)

    def _parse(self, index: int, line: bytes, where: str) -> SourceRow:
        row = super()._parse(index, line, where)
        if row.error is not None:
            return row
        rec = row.data
        data: dict[str, Any] = dict.fromkeys(OPENAI_COLUMNS) | {"custom_id": rec.get("custom_id")}
        body = rec.get("body")
        if not isinstance(body, dict):
            return SourceRow(index, data, error=f"request at {where} has no 'body' object")
        url = rec.get("url")
        if url is None:
            url = CHAT_URL if "messages" in body else COMPLETIONS_URL
        data["endpoint"] = url if isinstance(url, str) else None
        if url not in OPENAI_URLS:
            return SourceRow(
                index, data, error=f"unsupported url {url!r} at {where} (supported: {', '.join(OPENAI_URLS)})"
            )
        method = rec.get("method", "POST")
        if method != "POST":
            return SourceRow(index, data, error=f"unsupported method {method!r} at {where} (POST only)")
        chat = url == CHAT_URL
        data["messages"] = body.get("messages") if chat else None
        data["prompt"] = None if chat else body.get("prompt")
        data["model"] = body.get("model")
        data["chat_template_kwargs"] = body.get("chat_template_kwargs")
        if chat and data["messages"] is None:
            return SourceRow(index, data, error=f"{url} request at {where} has no 'messages'")
        if not chat and data["prompt"] is None:
            return SourceRow(index, data, error=f"{url} request at {where} has no 'prompt'")
        overrides: dict[str, Any] = {}
        for key, value in body.items():
            if key in OPENAI_IGNORED_FIELDS or value is None:
                continue
            if key in OPENAI_NEUTRAL_FIELDS:
                if value != OPENAI_NEUTRAL_FIELDS[key]:
                    return SourceRow(
                        index, data, error=f"unsupported request field {key}={value!r} at {where}"
                    )
                continue
            if key == "best_of" and value in (1, body.get("n", 1)):
                continue
            if key == "response_format":
                try:
                    schema = response_format_schema(value)
                except ValueError as e:
                    return SourceRow(index, data, error=f"{e} at {where}")
                if schema is not None:
                    overrides["json_schema"] = schema
                continue
            if key not in OPENAI_SAMPLING_FIELDS:
                return SourceRow(index, data, error=f"unsupported request field {key!r} at {where}")
            if key in ("logprobs", "top_logprobs"):
                problem = _logprobs_fields(key, value, chat, overrides)
                if problem is not None:
                    return SourceRow(index, data, error=f"{problem} at {where}")
                continue
            overrides[OPENAI_SAMPLING_FIELDS[key]] = value
        if overrides.get("top_logprobs") and not overrides.get("logprobs"):
            return SourceRow(index, data, error=f"top_logprobs needs logprobs=true at {where}")
        return SourceRow(index, data, sampling=overrides)


def _logprobs_fields(key: str, value: Any, chat: bool, overrides: dict[str, Any]) -> str | None:
    """Set the sampling fields of a request's ``logprobs`` or ``top_logprobs``; the problem, if any.

    Chat: ``logprobs`` is a boolean and ``top_logprobs`` the number of alternatives per token.
    Completions: ``logprobs`` is the number of alternatives (0 still returns the chosen tokens')."""
    if key == "top_logprobs":
        if not chat:
            return f"{COMPLETIONS_URL} takes the number of alternatives in 'logprobs', not 'top_logprobs'"
        overrides["top_logprobs"] = value
    elif chat or isinstance(value, bool):
        overrides["logprobs"] = bool(value)
    else:
        overrides["logprobs"] = isinstance(value, int)
        if isinstance(value, int):
            overrides["top_logprobs"] = value
    return None

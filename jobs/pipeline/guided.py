"""Constrained generation in jobs: a JSON schema from the config (inline or a file), per row (a column or an
OpenAI ``response_format``), and the ``json_valid`` column of the output rows."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from engine.outputs import RequestError
from engine.sampling_params import SamplingParams
from jobs.config import RunConfig, SourceFormat
from jobs.errors import JobError
from jobs.pipeline.prompts import RequestSpec

JSON_VALID_FIELD = pa.field("json_valid", pa.bool_())
"""Whether a row's completion parses as JSON: null for rows without a JSON schema."""


def load_json_schema(params: SamplingParams, where: str = "job.sampling.json_schema") -> SamplingParams:
    """``params`` with ``json_schema`` as JSON text: kept when it is JSON already, else read from the file it names."""
    value = params.json_schema
    if value is None:
        return params
    try:
        json.loads(value)
        return params
    except json.JSONDecodeError as e:
        path = Path(value).expanduser()
        looks_like_json = value.lstrip()[:1] in ("{", "[")
        if looks_like_json or not path.is_file():
            hint = "" if looks_like_json else f", nor a file (no such file: {path})"
            raise JobError(f"{where} is not JSON ({e}){hint}") from None
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JobError(f"{where}: cannot read a JSON schema from {path}: {e}") from None
    return dataclasses.replace(params, json_schema=text)


def has_json_rows(cfg: RunConfig, params: SamplingParams) -> bool:
    """Whether a run's rows can have a JSON schema: the job's, a schema column's, or an OpenAI request's."""
    return (
        params.json_schema is not None
        or cfg.data.json_schema_column is not None
        or cfg.data.format is SourceFormat.openai_batch
    )


def with_json_valid(schema: pa.Schema) -> pa.Schema:
    """The row schema with the ``json_valid`` column after ``completion``."""
    return schema.insert(schema.get_field_index("completion") + 1, JSON_VALID_FIELD)


def json_valid(params: SamplingParams, text: str) -> bool | None:
    """Whether ``text`` parses as JSON, for a sample with a JSON schema (None without one)."""
    if params.json_schema is None:
        return None
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def compiled_ahead(engine: Any, specs: Iterator[RequestSpec]) -> Iterator[RequestSpec]:
    """The requests, each one's constraint compiled (into the engine's cache) on the thread that iterates,
    off the engine loop; a constraint the engine refuses makes its request an error row."""
    compile_constraint = getattr(engine, "compile_constraint", None)
    for spec in specs:
        if compile_constraint is not None and spec.error is None and spec.params.constraint is not None:
            try:
                compile_constraint(spec.params)
            except RequestError as e:
                spec.error = str(e)
        yield spec

"""The stored types of dataclass fields (``SamplingParams``, ``StepRecord``): one table for the Arrow
type a field is written as and the check a per-row value must pass to be stored."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

_INT64 = range(-(2**63), 2**63)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v in _INT64


@dataclass(frozen=True)
class FieldType:
    arrow: pa.DataType
    check: Callable[[Any], bool]


FIELD_TYPES = {
    # keyed by the annotation as written (the modules use postponed annotations)
    "int": FieldType(pa.int64(), _is_int),
    "int | None": FieldType(pa.int64(), lambda v: v is None or _is_int(v)),
    "float": FieldType(pa.float64(), lambda v: isinstance(v, float) or _is_int(v)),
    "bool": FieldType(pa.bool_(), lambda v: isinstance(v, bool)),
    "str": FieldType(pa.string(), lambda v: isinstance(v, str)),
    "list[int]": FieldType(pa.list_(pa.int64()), lambda v: isinstance(v, list) and all(map(_is_int, v))),
    "list[str]": FieldType(
        pa.list_(pa.string()), lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
    ),
    "str | None": FieldType(pa.string(), lambda v: v is None or isinstance(v, str)),
    "list[str] | None": FieldType(
        pa.list_(pa.string()),
        lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
    ),
    # SamplingParams.json_schema: a mapping or its JSON text, kept as the text
    "Any": FieldType(pa.string(), lambda v: v is None or isinstance(v, str)),
}


def field_types(cls: type) -> dict[str, tuple[str, FieldType]]:
    """Each field of the dataclass ``cls``: its annotation and stored type."""
    return {f.name: (str(f.type), FIELD_TYPES[str(f.type)]) for f in dataclasses.fields(cls)}


def arrow_struct_fields(cls: type) -> list[tuple[str, pa.DataType]]:
    """(name, Arrow type) of each field of the dataclass ``cls``."""
    return [(name, t.arrow) for name, (_, t) in field_types(cls).items()]

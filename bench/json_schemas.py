"""JSON schemas for constrained generation: the set the tests validate outputs against and the grammar-library
comparison compiles (``bench/scripts/bench_grammar.py``), and the schema of the guided W2 benchmark.

Every schema is bounded (``maxLength``, ``maxItems``, integer ranges, enums), so that a model steered only by
the mask (a random one) reaches the end of the document within a few hundred tokens.
"""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 12}
_SHORT = {"type": "string", "maxLength": 8}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat_object": {
        "type": "object",
        "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "enum_string": {"type": "string", "enum": ["red", "green", "blue", "dark violet"]},
    "bounded_integer": {"type": "integer", "minimum": -50, "maximum": 50},
    "bounded_number": {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "temp": {"type": "number", "exclusiveMinimum": -10, "exclusiveMaximum": 40},
        },
        "required": ["ratio", "temp"],
        "additionalProperties": False,
    },
    "boolean_and_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"],
        "additionalProperties": False,
    },
    "string_array": {"type": "array", "items": _SHORT, "minItems": 1, "maxItems": 4},
    "integer_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 999},
        "maxItems": 5,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 99999},
                    "address": {
                        "type": "object",
                        "properties": {"city": _NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "title": _NAME,
            "subtitle": _SHORT,
            "pages": {"type": "integer", "minimum": 1, "maximum": 2000},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"sku": _SHORT, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "enum_in_object": {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "closed", "pending"]},
            "priority": {"type": "integer", "enum": [1, 2, 3]},
        },
        "required": ["status", "priority"],
        "additionalProperties": False,
    },
    "const_field": {
        "type": "object",
        "properties": {"version": {"const": "v1"}, "label": _SHORT},
        "required": ["version", "label"],
        "additionalProperties": False,
    },
    "ref_defs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -100, "maximum": 100},
                    "y": {"type": "integer", "minimum": -100, "maximum": 100},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    "ref_definitions": {
        "definitions": {"tag": {"type": "string", "enum": ["a", "b", "c"]}},
        "type": "array",
        "items": {"$ref": "#/definitions/tag"},
        "minItems": 1,
        "maxItems": 3,
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, _SHORT]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    "nullable_field": {
        "type": "object",
        "properties": {"note": {"type": ["string", "null"], "maxLength": 10}},
        "required": ["note"],
        "additionalProperties": False,
    },
    "pattern_string": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "date_format": {
        "type": "object",
        "properties": {"day": {"type": "string", "format": "date"}},
        "required": ["day"],
        "additionalProperties": False,
    },
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        "minItems": 1,
        "maxItems": 3,
    },
    "min_max_length": {
        "type": "object",
        "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 3}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "deep_nesting": {
        "type": "object",
        "properties": {
            "a": {
                "type": "object",
                "properties": {
                    "b": {
                        "type": "object",
                        "properties": {"c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
                        "required": ["c"],
                        "additionalProperties": False,
                    }
                },
                "required": ["b"],
                "additionalProperties": False,
            }
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "one_of": {
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "kind": {"const": "circle"},
                    "r": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["kind", "r"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {
                    "kind": {"const": "square"},
                    "side": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["kind", "side"],
                "additionalProperties": False,
            },
        ]
    },
}
"""Name -> schema (22 schemas)."""

W2_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 64},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
        "summary": {"type": "string"},
    },
    "required": ["title", "rating", "tags", "summary"],
    "additionalProperties": False,
}
"""The guided W2 benchmark's schema: a typical extraction record with one free-length text field."""

"""Constrained generation in jobs: ``job.sampling.json_schema`` (inline or a file), a per-row schema column, and
OpenAI's ``response_format``, on the built-in model; every completed row validates, and says so in ``json_valid``."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
import torch

from bench.json_schemas import SCHEMAS
from jobs import openai_batch
from jobs.errors import JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline.fingerprint import fingerprint
from jobs.pipeline.openai_output import ERRORS_NAME, OUTPUT_NAME
from jobs.pipeline.writer import ROW_SCHEMA
from jobs_helpers import PROMPTS, compose_config, read_rows, write_jsonl

pytest.importorskip("xgrammar", reason='the grammar library: pip install -e ".[guided]"')

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PERSON_OVERRIDE = (
    "job.sampling.json_schema={type: object, properties: {name: {type: string, maxLength: 10}, "
    "age: {type: integer, minimum: 0, maximum: 99}, tags: {type: array, items: {enum: [a, b]}, maxItems: 2}}, "
    "required: [name, age, tags], additionalProperties: false}"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def settings(root, models_dir, *extra):
    return [
        "job=synthetic_data",
        f"output_root={root}",
        f"models_dir={models_dir}",
        "data.limit=8",
        "job.sampling.max_new_tokens=120",
        "runner.progress=false",
        *extra,
    ]


def check_rows(rows, schema_of):
    """Completed rows validate against their schema and say json_valid; truncated ones are few."""
    assert rows and all(r["error"] is None for r in rows)
    for r in rows:
        schema = schema_of(r)
        if schema is None:
            assert r["json_valid"] is None
        elif r["finish_reason"] == "stop":
            jsonschema.validate(json.loads(r["completion"]), schema)
            assert r["json_valid"] is True
        else:
            assert r["finish_reason"] == "length" and r["completion_tokens"] == 120
    constrained = [r for r in rows if schema_of(r) is not None]
    assert sum(r["finish_reason"] == "length" for r in constrained) <= len(constrained) // 4


def test_job_schema_inline_and_from_a_file_constrains_every_row(tmp_path, models_dir):
    cfg = compose_config(settings(tmp_path / "inline", models_dir, PERSON_OVERRIDE))
    assert run_generation(cfg).complete
    rows = read_rows(output_dir(cfg))
    assert len(rows) == 16  # 8 rows x n=2
    check_rows(rows, lambda r: PERSON)
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON, indent=2))
    from_file = compose_config(
        settings(tmp_path / "file", models_dir, f"job.sampling.json_schema={schema_file}")
    )
    assert run_generation(from_file).complete
    check_rows(read_rows(output_dir(from_file)), lambda r: PERSON)


def test_a_schema_that_is_neither_json_nor_a_file_stops_the_job_at_start(tmp_path, models_dir):
    cfg = compose_config(settings(tmp_path, models_dir, f"job.sampling.json_schema={tmp_path}/missing.json"))
    with pytest.raises(JobError, match="is not JSON .* nor a file"):
        run_generation(cfg)
    assert not (tmp_path / "synthetic_data").exists()


def test_constrained_job_without_the_library_stops_at_start_naming_the_extra(
    tmp_path, models_dir, monkeypatch
):
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    cfg = compose_config(settings(tmp_path, models_dir, "job.sampling.regex='[a-z]+'"))
    with pytest.raises(JobError, match=r'pip install -e "\.\[guided\]"'):
        run_generation(cfg)


def test_per_row_schema_column(tmp_path, models_dir):
    names = ["flat_object", "enum_in_object", "ref_defs", "string_array", "one_of"]
    source = []
    for i, line in enumerate(PROMPTS.read_text().splitlines()[:7]):
        row = json.loads(line)
        if i < len(names):  # a mapping, or its JSON text
            row["schema"] = SCHEMAS[names[i]] if i % 2 else json.dumps(SCHEMAS[names[i]])
        else:
            row["schema"] = None  # unconstrained
        source.append(row)
    path = write_jsonl(tmp_path / "rows.jsonl", source)
    cfg = compose_config(
        settings(tmp_path, models_dir, "data=jsonl", f"data.path={path}", "data.id_column=id")
        + ["data.json_schema_column=schema", "job.sampling.n=1"]
    )
    assert run_generation(cfg).complete
    rows = read_rows(output_dir(cfg))
    schemas = {str(row["id"]): row["schema"] for row in source}
    schemas = {k: json.loads(v) if isinstance(v, str) else v for k, v in schemas.items()}
    check_rows(rows, lambda r: schemas[r["id"]])
    assert len(rows) == 7 and sum(r["json_valid"] is not None for r in rows) == len(names)


def test_rows_without_constraints_keep_their_schema_and_fingerprint(tmp_path, models_dir):
    cfg = compose_config(settings(tmp_path, models_dir))
    fp = fingerprint(cfg, cfg.job.sampling)
    assert not {"json_schema", "regex", "choice", "grammar"} & set(fp["sampling"])
    assert "json_schema_column" not in fp["data"]
    assert run_generation(cfg).complete
    assert "json_valid" not in read_rows(output_dir(cfg))[0]
    assert "json_valid" not in ROW_SCHEMA.names


def chat(cid, **body):
    messages = [{"role": "user", "content": f"Describe request {cid}."}]
    return {
        "custom_id": cid,
        "url": "/v1/chat/completions",
        "body": {"messages": messages, "max_tokens": 120} | body,
    }


def test_openai_response_format(tmp_path, models_dir):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    lines = [
        chat("schema", response_format=fmt, temperature=0),
        chat("schema-n2", response_format=fmt, n=2, seed=3),
        chat("object", response_format={"type": "json_object"}, temperature=0, max_tokens=60),
        chat("text", response_format={"type": "text"}, temperature=0, max_tokens=5),
        chat("bad-type", response_format={"type": "yaml"}),
        chat("no-schema", response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        chat(
            "bad-schema",
            response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}},
        ),
    ]
    batch = write_jsonl(tmp_path / "requests.jsonl", lines)
    cfg = compose_config(
        ["job=openai_batch", f"data.path={batch}", f"output_root={tmp_path}", f"models_dir={models_dir}"]
        + ["runner.progress=false"]
    )
    assert openai_batch.run(cfg).complete
    out = output_dir(cfg)
    answers = {}
    for line in map(json.loads, (out / OUTPUT_NAME).read_text().splitlines()):
        answers[line["custom_id"]] = line["response"]["body"]["choices"]
    errors = {
        e["custom_id"]: e["error"] for e in map(json.loads, (out / ERRORS_NAME).read_text().splitlines())
    }
    assert set(answers) == {"schema", "schema-n2", "object", "text"}
    assert set(errors) == {"bad-type", "no-schema", "bad-schema"}
    assert all(e["code"] == "invalid_request" for e in errors.values())
    assert "unsupported response_format" in errors["bad-type"]["message"]
    assert errors["bad-schema"]["message"].startswith("invalid json_schema: ")
    for choice in answers["schema"] + answers["schema-n2"]:
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert len(answers["schema-n2"]) == 2
    (obj,) = answers["object"]
    if obj["finish_reason"] == "stop":
        assert isinstance(json.loads(obj["message"]["content"]), dict)
    rows = {r["custom_id"]: r for r in read_rows(out)}
    assert rows["text-0"]["json_valid"] is None
    assert rows["schema-0"]["json_valid"] is (rows["schema-0"]["finish_reason"] == "stop")

"""Dirty data through the whole job (fake engine): each bad row is written with its error, or the job stops at start.

No bad row crashes the run or disappears: every source row gives ``n`` rows, exactly once.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.errors import JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs_helpers import PROMPTS, compose_config, fake_factory, read_rows, rows_by_custom_id

BAD_ROWS = [  # (prompt, messages, the error's text; None for a good row)
    ("fine", None, None),
    (None, None, "prompt column 'prompt' is missing or null"),
    ("", None, "prompt is empty"),
    (" \t\n ", None, "prompt is empty"),
    ("x" * 100_000, None, "exceeds the model's context length"),
    (42, None, "must be text, got int"),
    (["a", "b"], None, "must be text, got list"),
    ({"text": "a"}, None, "must be text, got dict"),
    (True, None, "must be text, got bool"),
    ("lone \ud800 surrogate", None, "prompt is not valid Unicode"),
    (None, {"role": "user", "content": "hi"}, "messages must be a list"),
    (None, ["hi"], "must be a dict with 'role' and 'content'"),
    (None, [{"role": "user"}], "must be a dict with 'role' and 'content'"),
    (None, [{"content": "x"}], "must be a dict with 'role' and 'content'"),
    (None, [[1, 2]], "must be a dict with 'role' and 'content'"),
    (None, [{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
    (None, [{"role": None, "content": "x"}], "unknown role None"),
    (None, [{"role": "user", "content": ["a"]}], "content must be a string"),
    (None, [{"role": "user", "content": "\udcff"}], "message 0 is not valid Unicode"),
    (None, [], "the chat has no messages"),
    (None, [{"role": "user", "content": "ok", "extra": 1}], None),
]


def config(root, *overrides):
    return compose_config([f"output_root={root}", "runner.progress=false", *overrides])


def run(cfg) -> dict[str, dict]:
    run_generation(cfg, make_engine=fake_factory()[1])
    assert Manifest.load(output_dir(cfg) / MANIFEST_NAME).complete
    return rows_by_custom_id(read_rows(output_dir(cfg)))


def test_every_bad_row_is_written_with_its_error_and_none_is_dropped(tmp_path):
    path = tmp_path / "dirty.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": p, "messages": m}) for i, (p, m, _) in enumerate(BAD_ROWS)]
    lines.insert(3, b'{"id": "utf8", "prompt": "caf\xe9 \xff"}'.decode("latin-1"))
    path.write_bytes("\n".join(lines).encode("latin-1", "surrogateescape") + b"\n")
    data = [f"data.path={path}", "data.id_column=id", "data.messages_column=messages"]
    rows = run(config(tmp_path, *data, "job.sampling.n=2", "job.sampling.max_new_tokens=8"))
    assert len(rows) == 2 * (len(BAD_ROWS) + 1)
    errors = {r["id"]: r["error"] for r in rows.values()}
    for i, (_, _, expected) in enumerate(BAD_ROWS):
        if expected is None:
            assert errors[f"r{i}"] is None
        else:
            assert expected in errors[f"r{i}"], (i, errors[f"r{i}"])
    assert "invalid UTF-8 at" in errors["row-3"] and "dirty.jsonl:4" in errors["row-3"]
    assert all(r["finish_reason"] == "error" for r in rows.values() if r["error"])


def test_bytes_column_is_text_when_utf8_and_an_error_row_when_not(tmp_path):
    prompts = pa.array(["héllo".encode(), b"\xff\xfe bad", b"", None], pa.binary())
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "a.parquet")
    rows = run(config(tmp_path, "data=parquet", f"data.path={tmp_path / 'a.parquet'}", "job.sampling.n=1"))
    errors = [rows[f"{i}-0"]["error"] for i in range(4)]
    assert errors[0] is None and "héllo" in rows["0-0"]["prompt"]
    assert "prompt column 'prompt' is not valid UTF-8" in errors[1]
    assert errors[2] == "prompt is empty" and "missing or null" in errors[3]


def test_column_missing_from_some_parquet_files_fails_at_start_naming_them(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"question": ["c"]}), tmp_path / "part-1.parquet")
    engines, make = fake_factory()
    with pytest.raises(
        JobError, match=r"column 'prompt' is missing from 1 of 2 parquet files \(.*part-1.parquet'\)"
    ):
        run_generation(config(tmp_path, "data=parquet", f"data.path={tmp_path}"), make_engine=make)
    assert not engines


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_empty_dataset_fails_at_start(tmp_path, fmt):
    if fmt == "jsonl":
        path = tmp_path / "empty.jsonl"
        path.write_text("\n\n")
    else:
        path = tmp_path / "empty.parquet"
        pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    engines, make = fake_factory()
    with pytest.raises(JobError, match=r"empty\.(jsonl|parquet)' has no rows"):
        run_generation(config(tmp_path, f"data={fmt}", f"data.path={path}"), make_engine=make)
    assert not engines


def test_dataset_smaller_than_the_shard_count_completes_every_shard(tmp_path):
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    seen = []
    for index in range(5):
        cfg = config(
            tmp_path,
            "data=jsonl",
            f"data.path={path}",
            "shard.count=5",
            f"shard.index={index}",
            "job.sampling.n=2",
        )
        rows = run(cfg)
        assert len(rows) == (2 if index < 3 else 0)
        seen += [(r["id"], r["sample_index"]) for r in rows.values()]
    assert sorted(seen) == [(str(i), s) for i in range(3) for s in range(2)]


prompt_values = st.one_of(
    st.none(),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=40),  # surrogates included
    st.just(""),
    st.text(" \t\n", max_size=5),
    st.integers(),
    st.lists(st.text(max_size=3), max_size=2),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompts=st.lists(prompt_values, min_size=1, max_size=12),
    ids=st.lists(st.text(max_size=12), min_size=12, max_size=12),
    n=st.integers(1, 3),
    every_rows=st.integers(1, 5),
    in_flight=st.integers(1, 6),
    chat=st.booleans(),
    shard=st.integers(1, 3).flatmap(lambda count: st.tuples(st.integers(0, count - 1), st.just(count))),
)
def test_random_prompts_and_configs_give_every_row_once_and_shards_read_back(
    prompts, ids, n, every_rows, in_flight, chat, shard
):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.jsonl"
        records = [{"id": f"{i}/{ids[i]}", "prompt": p} for i, p in enumerate(prompts)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        cfg = config(
            tmp,
            f"data.path={path}",
            "data.id_column=id",
            f"job.sampling.n={n}",
            "job.sampling.max_new_tokens=4",
            f"checkpoint.rows={every_rows}",
            f"runner.max_in_flight={in_flight}",
            f"job.prompt.chat_template={str(chat).lower()}",
            f"shard.index={shard[0]}",
            f"shard.count={shard[1]}",
        )
        rows = run(cfg)
        mine = [i for i in range(len(prompts)) if i % shard[1] == shard[0]]
        keys = sorted((r["id"], r["sample_index"]) for r in rows.values())
        assert keys == sorted((records[i]["id"], s) for i in mine for s in range(n))
        by_index = {r["row_index"]: r for r in rows.values()}
        for i in mine:
            p = prompts[i]
            usable = isinstance(p, str) and p.strip() and not any(0xD800 <= ord(c) < 0xE000 for c in p)
            assert (by_index[i]["error"] is None) == bool(usable), (p, by_index[i]["error"])
            if usable and not chat:
                assert by_index[i]["prompt"] == p


def test_openai_batch_sampling_fields_of_the_wrong_type_are_error_rows(tmp_path):
    bodies = [
        ({"top_k": True}, "top_k must be int, got True"),
        ({"seed": 2**70}, "seed must be int | None"),
        ({"seed": "abc"}, "seed must be an integer or None"),
        ({"n": 2.5}, "n must be an integer"),
        ({"temperature": "hot"}, "temperature must be"),
        ({"stop": [1, 2]}, "stop strings must be non-empty strings"),
        ({"stop_token_ids": ["a"]}, "bad sampling fields"),
        ({"logit_bias": {"1": 2}}, "unsupported request field logit_bias={'1': 2}"),
        ({"logit_bias": {}, "presence_penalty": 0}, None),
        ({"stop": "END", "max_tokens": 3}, None),
    ]
    path = tmp_path / "batch.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"custom_id": f"c{i}", "body": {"messages": [{"role": "user", "content": "hi"}]} | body}
            )
            + "\n"
            for i, (body, _) in enumerate(bodies)
        )
    )
    rows = run(config(tmp_path, "data=openai_batch", f"data.path={path}", "job.sampling.n=2"))
    assert len(rows) == 2 * len(bodies)
    for i, (_, expected) in enumerate(bodies):
        for s in range(2):
            error = rows[f"c{i}-{s}"]["error"]
            assert error is None if expected is None else expected in error, (i, error)


def test_a_plain_jsonl_read_as_an_openai_batch_file_is_refused_at_start(tmp_path):
    """The shipped prompts (50 plain JSON Lines rows) with data=openai_batch: every row would be an error row."""
    cfg = config(tmp_path, "data=openai_batch", f"data.path={PROMPTS}")
    made, factory = fake_factory()
    with pytest.raises(JobError, match="the first 32 rows of jsonl .* are not OpenAI batch requests") as err:
        run_generation(cfg, make_engine=factory)
    assert "has no 'body' object" in str(err.value) and "use data=jsonl" in str(err.value)
    assert not made and not Path(cfg.run_dir).exists(), "stopped before the engine and before any file"


def test_the_same_row_error_on_every_first_row_is_refused_but_a_few_bad_rows_are_error_rows(tmp_path):
    line = {"custom_id": "c", "body": {"prompt": "hi", "tools": [{"type": "function"}]}}
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line | {"custom_id": f"c{i}"}) + "\n" for i in range(3)))
    with pytest.raises(JobError, match="the first 3 rows .* unsupported request field 'tools'"):
        run_generation(
            config(tmp_path, "data=openai_batch", f"data.path={path}"), make_engine=fake_factory()[1]
        )
    good = {"custom_id": "ok", "body": {"prompt": "hi"}}
    path.write_text(path.read_text() + json.dumps(good) + "\n")
    rows = run(config(tmp_path, "data=openai_batch", f"data.path={path}", "job.sampling.n=1"))
    assert rows["ok-0"]["error"] is None and "unsupported request field" in rows["c0-0"]["error"]


def test_row_that_does_not_fit_the_schema_is_stored_as_an_error_row():
    from jobs.pipeline.writer import ROW_SCHEMA, rows_table

    good = dict.fromkeys(ROW_SCHEMA.names) | {
        "custom_id": "a-0",
        "id": "a",
        "sample_index": 0,
        "row_index": 0,
    }
    good |= {"completion": "text", "token_ids": [1, 2], "finish_reason": "stop", "config_hash": "h"}
    bad = good | {"custom_id": "b-0", "id": "b", "row_index": 1, "sampling": {"top_k": "many"}}
    table = rows_table([good, bad]).to_pylist()
    assert table[0]["completion"] == "text" and table[0]["error"] is None
    assert table[1]["id"] == "b" and table[1]["finish_reason"] == "error"
    assert table[1]["error"].startswith("row cannot be stored:")

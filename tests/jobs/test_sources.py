"""Sources: datasets (local, streamed or not), parquet files and globs, JSONL, OpenAI batch files; limit and shards."""

from __future__ import annotations

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.config import DataConfig, ShardConfig, SourceFormat
from jobs.errors import JobError
from jobs.pipeline.sources import open_source, select_rows, selected_count
from jobs_helpers import write_jsonl


def data(fmt: str, path, **kw) -> DataConfig:
    return DataConfig(name="t", format=SourceFormat[fmt], path=str(path), **kw)


def test_parquet_glob_reads_files_in_order_with_only_the_needed_columns(tmp_path):
    for k in range(2):
        table = pa.table({"q": [f"f{k}-{i}" for i in range(5)], "big": ["x" * 100] * 5, "n": list(range(5))})
        pq.write_table(table, tmp_path / f"part-{k}.parquet")
    src = open_source(data("parquet", tmp_path / "part-*.parquet", read_batch_rows=2), columns=["q"])
    assert src.num_rows() == 10 and src.columns() == ["q", "big", "n"]
    rows = list(src)
    assert [r.index for r in rows] == list(range(10))
    assert rows[6].data == {"q": "f1-1"}
    assert len(list(open_source(data("parquet", tmp_path)))) == 10, "a folder means every parquet file in it"


@pytest.mark.parametrize("streaming", [True, False])
def test_datasets_folder_saved_to_disk_any_split(tmp_path, streaming):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"prompt": ["a", "b"]}),
            "test": datasets.Dataset.from_dict({"prompt": ["c", "d", "e"], "other": [1, 2, 3]}),
        }
    )
    dd.save_to_disk(tmp_path / "ds")
    src = open_source(data("hf", tmp_path / "ds", split="test", streaming=streaming), columns=["prompt"])
    assert src.columns() == ["prompt", "other"]
    assert [r.data for r in src] == [{"prompt": "c"}, {"prompt": "d"}, {"prompt": "e"}]
    assert src.num_rows() == 3


def test_datasets_load_dataset_on_a_local_folder_streams(tmp_path):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(7)]}), tmp_path / "d" / "train-0.parquet")
    src = open_source(data("hf", tmp_path / "d", streaming=True))
    assert src.columns() == ["text"]
    assert [r.data["text"] for r in src] == [f"t{i}" for i in range(7)]


def test_unknown_dataset_fails_naming_it(tmp_path):
    with pytest.raises(JobError, match="no-such-dataset"):
        open_source(data("hf", tmp_path / "no-such-dataset"))


def test_jsonl_gzip_and_bad_lines(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write('{"prompt": "one"}\n\n[1, 2]\n{"prompt": "two"\n{"prompt": "three"}\n')
    rows = list(open_source(data("jsonl", tmp_path / "a.jsonl.gz")))
    assert [r.index for r in rows] == [0, 1, 2, 3]
    assert rows[0].data == {"prompt": "one"} and rows[3].data == {"prompt": "three"}
    assert "expected a JSON object" in rows[1].error and "invalid JSON at" in rows[2].error
    assert "a.jsonl.gz:4" in rows[2].error


def test_jsonl_row_count_is_known_for_plain_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": str(i)} for i in range(9)])
    assert open_source(data("jsonl", tmp_path / "a.jsonl")).num_rows() == 9


def test_jsonl_that_is_not_json_fails_at_start(tmp_path):
    (tmp_path / "notes.jsonl").write_text("hello world\n")
    with pytest.raises(JobError, match="notes.jsonl"):
        open_source(data("jsonl", tmp_path / "notes.jsonl"))


def test_openai_batch_requests_map_to_rows_and_sampling_overrides(tmp_path):
    def request(cid, body):
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}

    lines = [
        request(
            "chat-1",
            {
                "model": "gpt-x",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 12,
                "temperature": 0.2,
                "top_p": 0.9,
                "seed": 7,
                "stop": "END",
                "n": 3,
                "logprobs": True,
            },
        ),
        {
            "custom_id": "done-2",
            "url": "/v1/completions",
            "body": {"prompt": "Once", "max_completion_tokens": 5},
        },
        request("bad-3", {"messages": [], "frequency_penalty": 0.5}),
        {"custom_id": "nobody-4"},
    ]
    src = open_source(data("openai_batch", write_jsonl(tmp_path / "batch.jsonl", lines)))
    assert src.columns() == ["custom_id", "messages", "prompt", "endpoint", "model", "chat_template_kwargs"]
    rows = list(src)
    assert rows[0].data == {
        "custom_id": "chat-1",
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": None,
        "endpoint": "/v1/chat/completions",
        "model": "gpt-x",
        "chat_template_kwargs": None,
    }
    assert rows[0].sampling == {
        "max_new_tokens": 12,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": "END",
        "n": 3,
        "logprobs": True,
    }
    assert rows[1].data["prompt"] == "Once" and rows[1].sampling == {"max_new_tokens": 5}
    assert "unsupported request field frequency_penalty=0.5" in rows[2].error
    assert "no 'body'" in rows[3].error and rows[3].data["custom_id"] == "nobody-4"


def test_openai_top_logprobs_map_to_sampling_as_each_endpoint_asks(tmp_path):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    lines = [
        {
            "custom_id": "c1",
            "url": "/v1/chat/completions",
            "body": chat | {"logprobs": True, "top_logprobs": 5},
        },
        {"custom_id": "c2", "url": "/v1/chat/completions", "body": chat | {"top_logprobs": 2}},
        {
            "custom_id": "c3",
            "url": "/v1/chat/completions",
            "body": chat | {"logprobs": False, "top_logprobs": 0},
        },
        {"custom_id": "t1", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": 3}},
        {"custom_id": "t2", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": 0}},
        {
            "custom_id": "t3",
            "url": "/v1/completions",
            "body": {"prompt": "x", "logprobs": 1, "top_logprobs": 2},
        },
    ]
    rows = list(open_source(data("openai_batch", write_jsonl(tmp_path / "batch.jsonl", lines))))
    assert rows[0].sampling == {"logprobs": True, "top_logprobs": 5}
    assert "top_logprobs needs logprobs=true" in rows[1].error  # as OpenAI's API answers
    assert rows[2].error is None and rows[2].sampling == {"logprobs": False, "top_logprobs": 0}
    assert rows[3].sampling == {"logprobs": True, "top_logprobs": 3}  # completions: the number is k
    assert rows[4].sampling == {"logprobs": True, "top_logprobs": 0}
    assert "takes the number of alternatives in 'logprobs'" in rows[5].error


def test_limit_then_shard_selects_row_index_modulo_count(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": str(i)} for i in range(30)])
    src = open_source(data("jsonl", tmp_path / "a.jsonl"))
    picked = [r.index for r in select_rows(src, 20, ShardConfig(index=2, count=4))]
    assert picked == [2, 6, 10, 14, 18]
    assert selected_count(src.num_rows(), 20, ShardConfig(index=2, count=4)) == 5


@given(
    total=st.integers(0, 200),
    limit=st.none() | st.integers(0, 250),
    count=st.integers(1, 9),
    data_=st.data(),
)
def test_selected_count_matches_select_rows(total, limit, count, data_):
    index = data_.draw(st.integers(0, count - 1))
    n = total if limit is None else min(total, limit)
    expected = sum(1 for i in range(n) if i % count == index)
    assert selected_count(total, limit, ShardConfig(index=index, count=count)) == expected


def test_missing_path_names_it(tmp_path):
    with pytest.raises(JobError, match="nothing-here"):
        open_source(data("parquet", tmp_path / "nothing-here"))
    with pytest.raises(JobError, match=r"no \.parquet files match"):
        open_source(data("parquet", tmp_path / "*.parquet"))


def test_datasets_source_reads_lazily(tmp_path):
    pq.write_table(pa.table({"prompt": [json.dumps(i) for i in range(50)]}), tmp_path / "x.parquet")
    src = open_source(data("hf", tmp_path, streaming=True))
    it = iter(src)
    assert next(it).data == {"prompt": "0"}

"""Output shards: atomic commits and a schema that datasets and pyarrow both read."""

from __future__ import annotations

import dataclasses

import datasets
import pyarrow as pa
import pytest

from engine.sampling_params import SamplingParams
from jobs.distill import run as run_distill
from jobs.generate import output_dir
from jobs.pipeline.atomic import commit_file
from jobs.pipeline.manifest import read_stream
from jobs.pipeline.writer import ROW_SCHEMA, SAMPLING_TYPE, UNSTORED_SAMPLING_FIELDS
from jobs_helpers import compose_config, fake_factory


def test_failed_commit_leaves_neither_the_file_nor_a_temporary(tmp_path):
    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        commit_file(tmp_path / "x.arrow", fail)
    assert list(tmp_path.iterdir()) == []
    commit_file(tmp_path / "x.arrow", lambda f: f.write(b"ok"))
    assert (tmp_path / "x.arrow").read_bytes() == b"ok" and len(list(tmp_path.iterdir())) == 1


def test_sampling_column_covers_every_sampling_parameter():
    # prompt_logprobs (the score job's) and the constraints are left out: the generation row schema is the
    # one it was before (a run with JSON schemas adds json_valid).
    assert UNSTORED_SAMPLING_FIELDS == ("prompt_logprobs", "json_schema", "regex", "choice", "grammar")
    assert [f.name for f in SAMPLING_TYPE] == [
        f.name for f in dataclasses.fields(SamplingParams) if f.name not in UNSTORED_SAMPLING_FIELDS
    ]


def test_distill_output_loads_with_datasets_and_pyarrow(tmp_path):
    cfg = compose_config(
        [f"output_root={tmp_path}", "runner.progress=false", "job=distill", "checkpoint.rows=8"]
    )
    run_distill(cfg, make_engine=fake_factory()[1])
    files = sorted((output_dir(cfg) / "generations").glob("*.arrow"))
    assert len(files) > 1
    ds = datasets.load_dataset("arrow", data_files=[str(p) for p in files], split="train")
    assert ds.num_rows == 50 and set(ds.column_names) == set(ROW_SCHEMA.names)
    row = ds[0]
    assert row["sampling"]["logprobs"] is True and len(row["logprobs"]) == row["completion_tokens"]
    table = pa.concat_tables(read_stream(p) for p in files)
    assert table.schema.equals(ROW_SCHEMA) and table.num_rows == 50
    steps = datasets.Dataset.from_file(str(next((output_dir(cfg) / "steps").glob("*.arrow"))))
    assert {"step", "gpu_compute_s", "kv_blocks_used", "attempt"} <= set(steps.column_names)


def test_top_columns_are_built_from_arrays_with_any_k_per_row():
    import numpy as np

    from jobs.errors import JobError
    from jobs.pipeline.writer import _offsets, rows_table

    def row(cid, k=None, n=0):
        top = {}
        if k is not None:  # ids i*k + j, logprobs -(i*k + j)
            ids = np.arange(n * k, dtype=np.int32).reshape(n, k)
            top = {"top_token_ids": ids, "top_logprobs": -ids.astype(np.float32)}
        return dict.fromkeys(ROW_SCHEMA.names) | {"custom_id": cid} | top

    table = rows_table([row("a", 2, 3), row("b"), row("c", 5, 0), row("d", 1, 2)])
    assert table.schema.equals(ROW_SCHEMA)
    assert table["top_token_ids"].to_pylist() == [[[0, 1], [2, 3], [4, 5]], None, [], [[0], [1]]]
    assert table["top_logprobs"].to_pylist() == [[[0, -1], [-2, -3], [-4, -5]], None, [], [[0], [-1]]]
    with pytest.raises(JobError, match="lower checkpoint.rows"):
        _offsets(np.array([2**31], dtype=np.int64))

"""The job loop with a fast fake engine: complete and unique rows, a fed engine, bad rows, sharding."""

from __future__ import annotations

import json
import time

import pytest

from jobs.errors import JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs_helpers import PROMPTS, compose_config, fake_factory, read_rows, rows_by_custom_id, write_jsonl


def config(tmp_path, *overrides):
    return compose_config([f"output_root={tmp_path}", "runner.progress=false", *overrides])


def test_every_source_row_gives_n_rows_exactly_once(tmp_path):
    cfg = config(tmp_path, "job.sampling.n=3", "checkpoint.rows=7")
    _, make = fake_factory(max_num_seqs=4)
    stats = run_generation(cfg, make_engine=make)
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    ids = [json.loads(line)["id"] for line in PROMPTS.read_text().splitlines()]
    assert set(rows) == {f"{i}-{k}" for i in ids for k in range(3)}
    assert stats.complete and stats.output_rows == 150 and stats.error_rows == 0
    manifest = Manifest.load(output_dir(cfg) / MANIFEST_NAME)
    assert manifest.complete and manifest.rows == 150 and len(manifest.chunks) > 10
    row = rows["p002-1"]
    assert row["id"] == "p002" and row["sample_index"] == 1 and row["row_index"] == 1
    assert row["prompt"].startswith("<user>Give a simple recipe")
    assert json.loads(row["messages"]) == [
        {"role": "user", "content": json.loads(PROMPTS.read_text().splitlines()[1])["prompt"]}
    ]
    assert row["sampling"]["n"] == 3 and row["sampling"]["temperature"] == cfg.job.sampling.temperature
    assert row["completion_tokens"] == len(row["token_ids"]) > 0 and row["prompt_tokens"] > 0
    assert {r["config_hash"] for r in rows.values()} == {manifest.config_hash}


def test_samples_finish_out_of_order_and_are_committed_per_source_row(tmp_path):
    cfg = config(tmp_path, "job.sampling.n=4", "checkpoint.rows=1")
    _, make = fake_factory(max_num_seqs=3)
    run_generation(cfg, make_engine=make)
    manifest = Manifest.load(output_dir(cfg) / MANIFEST_NAME)
    order = [r["row_index"] for r in read_rows(output_dir(cfg))]
    assert order != sorted(order), "the fake engine finishes rows out of order"
    assert all(s.rows == 4 * s.sources for s in manifest.chunks)


def test_engine_is_kept_fed_with_twice_max_num_seqs(tmp_path):
    cfg = config(tmp_path, "engine.max_num_seqs=4", "job.sampling.n=2")
    engines, make = fake_factory(max_num_seqs=4)
    run_generation(cfg, make_engine=make)
    log = engines[0].unfinished_log
    target = 2 * 4
    first_low = next(i for i, u in enumerate(log) if u < target)
    assert all(target <= u <= target + 1 for u in log[:first_low]), log[:first_low]
    assert log[first_low:] == sorted(log[first_low:], reverse=True), (
        "below the target only once the source is exhausted"
    )
    assert first_low > 20


def test_max_in_flight_is_configurable(tmp_path):
    cfg = config(tmp_path, "runner.max_in_flight=3", "job.sampling.n=1")
    engines, make = fake_factory(max_num_seqs=8)
    run_generation(cfg, make_engine=make)
    assert max(engines[0].unfinished_log) == 3


def test_bad_rows_are_written_with_their_error_and_the_job_goes_on(tmp_path):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"id": "ok1", "prompt": "hello"},
            {"id": "null", "prompt": None},
            {"id": "empty", "prompt": "   "},
            {"id": "number", "prompt": 42},
            {"id": "missing"},
            {"id": "long", "prompt": "x" * 600},
            {"id": None, "prompt": "no id"},
            {"id": "ok2", "prompt": "world"},
        ],
    )
    with open(data, "a") as f:
        f.write("{not json\n")
    cfg = config(tmp_path, f"data.path={data}", "job.sampling.n=2", "job.sampling.max_new_tokens=8")
    run_generation(cfg, make_engine=fake_factory()[1])
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))
    assert len(rows) == 2 * 9
    errors = {cid.rsplit("-", 1)[0]: r["error"] for cid, r in rows.items() if r["sample_index"] == 0}
    assert errors["ok1"] is None and errors["ok2"] is None
    assert "'prompt' is missing or null" in errors["null"]
    assert errors["empty"] == "prompt is empty"
    assert "must be text, got int" in errors["number"]
    assert "'prompt' is missing or null" in errors["missing"]
    assert "context length" in errors["long"]
    assert "id column 'id' is null" in errors["row-6"]
    assert "invalid JSON" in errors["row-8"]
    assert all(r["finish_reason"] == "error" for r in rows.values() if r["error"])


def test_missing_column_fails_at_start_naming_it(tmp_path):
    engines, make = fake_factory()
    cfg = config(tmp_path, "data.prompt_column=question")
    with pytest.raises(JobError, match="no column 'question'"):
        run_generation(cfg, make_engine=make)
    cfg = config(tmp_path, "job.prompt.template='About {subject}: {topic}'")
    with pytest.raises(JobError, match="no column 'subject'"):
        run_generation(cfg, make_engine=make)
    assert engines == []


def test_unreadable_or_missing_files_fail_at_start_naming_them(tmp_path):
    engines, make = fake_factory()
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(JobError, match="broken.parquet"):
        run_generation(config(tmp_path, "data.format=parquet", f"data.path={broken}"), make_engine=make)
    with pytest.raises(JobError, match="nowhere.jsonl"):
        run_generation(config(tmp_path, f"data.path={tmp_path}/nowhere.jsonl"), make_engine=make)
    assert engines == []


def test_template_over_fields_with_system_prompt(tmp_path):
    cfg = config(
        tmp_path,
        "job.prompt.template='Write a {style} about {topic}.'",
        "job.prompt.system='Be brief.'",
        "job.sampling.n=1",
    )
    run_generation(cfg, make_engine=fake_factory()[1])
    row = rows_by_custom_id(read_rows(output_dir(cfg)))["p001-0"]
    assert row["prompt"] == "<system>Be brief.<user>Write a explanation about astronomy.<assistant>"


def test_shard_selects_row_index_modulo_count_into_its_own_folder(tmp_path):
    cfg = config(tmp_path, "shard.index=1", "shard.count=3", "job.sampling.n=1", "data.limit=20")
    run_generation(cfg, make_engine=fake_factory()[1])
    assert output_dir(cfg).name == "shard-00001-of-00003"
    rows = read_rows(output_dir(cfg))
    assert sorted(r["row_index"] for r in rows) == [i for i in range(20) if i % 3 == 1]


def test_limit_keeps_the_first_rows_and_a_larger_limit_resumes(tmp_path):
    _, make = fake_factory()
    run_generation(config(tmp_path, "data.limit=5"), make_engine=make)
    engines, make = fake_factory()
    cfg = config(tmp_path, "data.limit=12")
    stats = run_generation(cfg, make_engine=make)
    assert stats.skipped_rows == 5 and stats.source_rows == 7
    assert sorted({r["row_index"] for r in read_rows(output_dir(cfg))}) == list(range(12))


def test_changed_config_is_refused_and_overwrite_starts_over(tmp_path):
    run_generation(config(tmp_path, "data.limit=4"), make_engine=fake_factory()[1])
    engines, make = fake_factory()
    with pytest.raises(
        JobError, match=r"different config \(sampling.temperature: 0.8 -> 0.3\).*overwrite=true"
    ):
        run_generation(config(tmp_path, "data.limit=4", "job.sampling.temperature=0.3"), make_engine=make)
    assert engines == [], "refused before the model loads"
    assert "temperature: 0.8" in (output_dir(config(tmp_path)) / "config.yaml").read_text(), "config kept"
    cfg = config(tmp_path, "data.limit=4", "job.sampling.temperature=0.3", "overwrite=true")
    stats = run_generation(cfg, make_engine=make)
    assert stats.skipped_rows == 0 and stats.source_rows == 4
    assert {r["sampling"]["temperature"] for r in read_rows(output_dir(cfg))} == {0.3}


def test_settings_that_do_not_change_rows_may_change_on_resume(tmp_path):
    run_generation(config(tmp_path, "data.limit=4"), make_engine=fake_factory()[1])
    cfg = config(
        tmp_path, "data.limit=6", "engine.max_num_seqs=3", "checkpoint.rows=1", "runner.max_in_flight=5"
    )
    assert run_generation(cfg, make_engine=fake_factory()[1]).skipped_rows == 4


def test_checkpoint_every_n_seconds_commits_before_the_row_count_is_reached(tmp_path):
    by_rows = config(tmp_path / "rows", "checkpoint.rows=1000", "checkpoint.seconds=3600")
    run_generation(by_rows, make_engine=fake_factory(max_num_seqs=4)[1])
    assert len(Manifest.load(output_dir(by_rows) / MANIFEST_NAME).chunks) == 1
    by_time = config(tmp_path / "time", "checkpoint.rows=1000", "checkpoint.seconds=0")
    # A step that takes a few milliseconds, as a real one does: each background commit is done before the next is due.
    run_generation(by_time, make_engine=fake_factory(max_num_seqs=4, on_step=lambda *a: time.sleep(0.005))[1])
    assert len(Manifest.load(output_dir(by_time) / MANIFEST_NAME).chunks) > 10


DUPLICATE_IDS = ["a", "b", "a", "c", "b", "d"]


def duplicate_source(tmp_path):
    return write_jsonl(
        tmp_path / "dups.jsonl", [{"id": i, "prompt": f"row {k}"} for k, i in enumerate(DUPLICATE_IDS)]
    )


@pytest.mark.parametrize("max_in_flight", [1, 16])
def test_a_repeated_id_is_an_error_row_whatever_max_in_flight(tmp_path, max_in_flight):
    data = duplicate_source(tmp_path)
    cfg = config(tmp_path, f"data.path={data}", "job.sampling.n=2", f"runner.max_in_flight={max_in_flight}")
    stats = run_generation(cfg, make_engine=fake_factory()[1])
    rows = rows_by_custom_id(read_rows(output_dir(cfg)))  # custom_ids stay unique
    assert len(rows) == 2 * 6 and stats.complete and stats.source_rows == 6
    by_index = {(r["row_index"], r["sample_index"]): r for r in rows.values()}
    for k in (0, 1, 3, 5):
        assert by_index[k, 0]["error"] is None and by_index[k, 0]["custom_id"] == f"{DUPLICATE_IDS[k]}-0"
    for k, first in ((2, 0), (4, 1)):
        for s in (0, 1):
            row = by_index[k, s]
            assert row["id"] == DUPLICATE_IDS[k] and row["finish_reason"] == "error"
            assert row["error"] == f"duplicate id, first seen at source row {first}"
    assert stats.error_rows == 4


def test_lowering_the_limit_below_committed_rows_of_an_incomplete_run_is_refused(tmp_path):
    def fail_at_step_6(engine):
        if engine.steps == 6:
            raise RuntimeError("node lost")

    def cfg_at(limit):
        settings = ("checkpoint.rows=1", "job.sampling.n=1", "job.sampling.max_new_tokens=8")
        return config(tmp_path, f"data.limit={limit}", *settings)

    with pytest.raises(RuntimeError, match="node lost"):
        run_generation(cfg_at(10), make_engine=fake_factory(max_num_seqs=4, on_step=fail_at_step_6)[1])
    out = output_dir(cfg_at(10))
    last = max(r["row_index"] for r in read_rows(out))
    assert 1 <= last < 9, "an incomplete run with rows beyond a lower limit"
    engines, make = fake_factory()
    with pytest.raises(
        JobError, match=rf"rows up to source row {last}, beyond data.limit={last}.*data.limit=10"
    ):
        run_generation(cfg_at(last), make_engine=make)
    assert engines == [], "refused before the model loads"
    assert not Manifest.load(out / MANIFEST_NAME).complete
    assert run_generation(cfg_at(last + 1), make_engine=make).complete  # keeps every committed row: fine
    run_generation(cfg_at(10), make_engine=make)
    assert sorted(r["row_index"] for r in read_rows(out)) == list(range(10))

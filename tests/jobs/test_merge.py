"""The merge job: a complete split run becomes one dataset; missing or incomplete shards are named, not dropped."""

from __future__ import annotations

import datasets
import pytest
from hydra import compose, initialize_config_dir

from jobs import cli, merge
from jobs.cli import register_configs
from jobs.errors import JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs_helpers import CONF_DIR, compose_config, fake_factory, read_rows, rows_by_custom_id

RUN = "synthetic_data/tiny-chat-tiny-prompts"


def run_shards(root, indices, count=3, *overrides):
    rows = []
    for index in indices:
        cfg = compose_config(
            [
                f"output_root={root}",
                "runner.progress=false",
                "data.limit=20",
                f"shard.index={index}",
                f"shard.count={count}",
                *overrides,
            ]
        )
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
        rows += read_rows(output_dir(cfg))
    return rows


def merge_status(run_dir, capsys) -> tuple[int, str]:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["job=merge", f"run_dir={run_dir}"])
    return cli.main(cfg), capsys.readouterr().err


def test_merge_presents_a_complete_split_run_as_one_dataset(tmp_path, capsys, monkeypatch):
    expected = rows_by_custom_id(run_shards(tmp_path, range(3)))
    run_dir = tmp_path / RUN
    status, err = merge_status(run_dir, capsys)
    assert status == 0, err
    card = (run_dir / merge.CARD_NAME).read_text()
    assert "shard-00002-of-00003/generations/chunk-000001.arrow" in card and "40 rows from 3" in card
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    loaded = datasets.load_dataset(str(run_dir), split="train")
    assert rows_by_custom_id(loaded.to_list()) == expected
    assert datasets.load_dataset(str(run_dir), "steps", split="train").num_rows > 0
    assert rows_by_custom_id(merge.load_run(run_dir).to_list()) == expected


def test_merge_names_missing_and_incomplete_shards_and_writes_nothing(tmp_path, capsys):
    run_shards(tmp_path, [0, 1], count=4)
    run_dir = tmp_path / RUN
    manifest = Manifest.load(run_dir / "shard-00001-of-00004" / MANIFEST_NAME)
    manifest.complete = False  # as a killed shard leaves it
    manifest.save()
    status, err = merge_status(run_dir, capsys)
    assert status == cli.EXIT_ERROR
    assert "shard 1 of 0..3 (shard-00001-of-00004): incomplete, 10 rows committed" in err
    assert "shard 2 of 0..3 (shard-00002-of-00004): missing" in err
    assert "shard 3 of 0..3 (shard-00003-of-00004): missing" in err
    assert "shard 0 of" not in err and not (run_dir / merge.CARD_NAME).exists()
    with pytest.raises(JobError, match="not complete; not merged"):
        merge.load_run(run_dir)


def test_merge_refuses_shards_made_with_different_configs(tmp_path):
    run_shards(tmp_path, [0], 2)
    run_shards(tmp_path, [1], 2, "job.sampling.temperature=0.1")
    check = merge.check_run(tmp_path / RUN)
    assert [p for p in check.problems if "different config hashes" in p]


def test_merge_of_an_unsplit_run_and_of_no_run(tmp_path):
    cfg = compose_config([f"output_root={tmp_path}", "runner.progress=false", "data.limit=5"])
    run_generation(cfg, make_engine=fake_factory()[1])
    assert rows_by_custom_id(merge.load_run(output_dir(cfg)).to_list()) == rows_by_custom_id(
        read_rows(output_dir(cfg))
    )
    with pytest.raises(JobError, match="no run directory"):
        merge.check_run(tmp_path / "nothing")

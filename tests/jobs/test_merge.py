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
    loaded = datasets.load_dataset(str(run_dir), split="train", cache_dir=str(tmp_path / "cache"))
    assert rows_by_custom_id(loaded.to_list()) == expected
    assert (
        datasets.load_dataset(
            str(run_dir), "steps", split="train", cache_dir=str(tmp_path / "cache")
        ).num_rows
        > 0
    )
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


def test_a_split_run_into_the_folder_of_an_unsplit_one_is_refused_at_start_with_the_way_out(tmp_path, capsys):
    """The README's order: the default job, then a 4-shard multirun with the same run folder."""
    run_shards(tmp_path, [0], 1)
    run_dir = tmp_path / RUN
    with pytest.raises(JobError, match="holds an unsplit run") as err:
        run_shards(tmp_path, [0], 4)
    assert f"run_dir={run_dir}-4-shards" in str(err.value) and "overwrite=true" in str(err.value)
    assert not list(run_dir.glob("shard-*")), "refused before writing anything"
    expected = rows_by_custom_id(run_shards(tmp_path, range(4), 4, "overwrite=true"))
    assert not (run_dir / MANIFEST_NAME).exists() and not (run_dir / "generations").exists()
    status, err = merge_status(run_dir, capsys)
    assert status == 0, err
    assert rows_by_custom_id(merge.load_run(run_dir).to_list()) == expected


def test_an_unsplit_run_into_the_folder_of_a_split_one_is_refused_at_start(tmp_path):
    run_shards(tmp_path, [0, 1], 2)
    run_dir = tmp_path / RUN
    with pytest.raises(JobError, match="holds shard folders of another split") as err:
        run_shards(tmp_path, [0], 1)
    assert f"run_dir={run_dir}-single" in str(err.value) and not (run_dir / MANIFEST_NAME).exists()
    with pytest.raises(JobError, match="shard-00000-of-00002, shard-00001-of-00002"):
        run_shards(tmp_path, [0], 3)
    run_shards(tmp_path, [0], 1, "overwrite=true")
    assert not list(run_dir.glob("shard-*")) and Manifest.load(run_dir / MANIFEST_NAME).complete


def test_a_run_that_resumes_or_extends_removes_the_dataset_card_of_an_earlier_merge(tmp_path, capsys):
    run_shards(tmp_path, range(2), 2)
    run_dir = tmp_path / RUN
    assert merge_status(run_dir, capsys)[0] == 0 and (run_dir / merge.CARD_NAME).exists()
    run_shards(tmp_path, range(2), 2)  # complete: nothing to do, the card still lists every file
    assert (run_dir / merge.CARD_NAME).exists()
    run_shards(tmp_path, [0], 2, "data.limit=30")  # extends shard 0: the card would list old files only
    assert not (run_dir / merge.CARD_NAME).exists()
    status, err = merge_status(run_dir, capsys)
    assert status == 2 and "different data.limit values: ['20', '30']" in err, err

"""Sharding with the fake engine: Slurm's variables, disjoint covering shards, the shard map, completion markers."""

from __future__ import annotations

import os
import signal

import pytest
from hydra import compose, initialize_config_dir

from jobs import distill
from jobs.cli import register_configs
from jobs.config import ShardConfig
from jobs.errors import Interrupted, JobError
from jobs.generate import output_dir, run_generation
from jobs.pipeline.completion import is_complete
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs.pipeline.shards import resolve_shard, slurm_shard
from jobs_helpers import CONF_DIR, compose_config, fake_factory, read_rows, rows_by_custom_id, write_jsonl
from launch import requeue

SLURM_VARS = (
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SUBMITIT_EXECUTOR",
)


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    """Tests start outside any Slurm job, whatever machine runs them."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


def config(root, *overrides):
    return compose_config([f"output_root={root}", "runner.progress=false", "job.sampling.n=1", *overrides])


def array(task, low, high, **extra):
    return {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": str(low),
        "SLURM_ARRAY_TASK_MAX": str(high),
        "SLURM_ARRAY_TASK_COUNT": str(high - low + 1),
    } | extra


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, None),
        (array(2, 0, 3), (2, 4)),
        (array(5, 1, 8), (4, 8)),  # --array=1-8: ids need not start at 0
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (3, 4)),  # srun -n 4
        (array(1, 0, 2, SLURM_PROCID="1", SLURM_NTASKS="2"), (3, 6)),  # 3 array tasks x 2 srun tasks
        (array(0, 0, 0), None),
        # Under submitit the array is Hydra's sweep (the shard is in the overrides); only the task rank counts.
        (array(2, 0, 3, SUBMITIT_EXECUTOR="slurm"), None),
        (array(2, 0, 3, SUBMITIT_EXECUTOR="slurm", SLURM_PROCID="1", SLURM_NTASKS="2"), (1, 2)),
    ],
)
def test_shard_is_taken_from_slurm_array_or_task_variables(env, expected):
    assert slurm_shard(env) == expected
    index, count = expected or (0, 1)
    assert resolve_shard(ShardConfig(), env) == ShardConfig(index, count)


def test_explicit_shard_wins_over_slurm_and_bad_settings_are_refused():
    env = array(2, 0, 3)
    assert resolve_shard(ShardConfig(1, 2), env) == ShardConfig(1, 2)
    assert resolve_shard(ShardConfig(count=8), env) == ShardConfig(2, 8)
    with pytest.raises(JobError, match="not a contiguous range"):
        resolve_shard(ShardConfig(), {**array(3, 1, 7), "SLURM_ARRAY_TASK_COUNT": "4"})  # --array=1-7:2
    with pytest.raises(JobError, match=r"shard.index must be in \[0, shard.count\)"):
        resolve_shard(ShardConfig(4, 4), {})


def test_job_in_a_slurm_array_writes_its_rows_to_its_own_shard_folder(tmp_path, monkeypatch):
    for name, value in array(1, 0, 2).items():
        monkeypatch.setenv(name, value)
    cfg = config(tmp_path, "data.limit=20")
    run_generation(cfg, make_engine=fake_factory()[1])
    out = tmp_path / "synthetic_data" / "tiny-chat-tiny-prompts" / "shard-00001-of-00003"
    assert output_dir(cfg) == out
    assert sorted(r["row_index"] for r in read_rows(out)) == [i for i in range(20) if i % 3 == 1]
    assert Manifest.load(out / MANIFEST_NAME).shard_map["index"] == 1
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides=[f"output_root={tmp_path}"], return_hydra_config=True)
    assert raw.hydra.run.dir == str(out), "Hydra's log goes to the shard's folder too"


def test_multirun_sweep_shares_one_deterministic_run_dir_with_one_folder_per_shard():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose("config", overrides=["shard.index=2", "shard.count=4"], return_hydra_config=True)
        plain = compose("config", overrides=["run_dir=/runs/x"], return_hydra_config=True)
    assert raw.hydra.sweep.dir == "outputs/synthetic_data/tiny-chat-tiny-prompts"
    assert raw.hydra.sweep.subdir == "shard-00002-of-00004"
    assert raw.hydra.run.dir == "outputs/synthetic_data/tiny-chat-tiny-prompts/shard-00002-of-00004"
    assert plain.hydra.run.dir == "/runs/x" and plain.hydra.sweep.subdir == "."


def test_shards_are_disjoint_and_cover_the_rows_of_a_single_run(tmp_path):
    single = config(tmp_path / "single", "job.sampling.n=2")
    run_generation(single, make_engine=fake_factory(max_num_seqs=4)[1])
    expected = rows_by_custom_id(read_rows(output_dir(single)))
    merged = []
    for index in range(3):
        cfg = config(tmp_path / "split", "job.sampling.n=2", f"shard.index={index}", "shard.count=3")
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
        merged += read_rows(output_dir(cfg))
    assert rows_by_custom_id(merged) == expected, "same rows, none twice, same config hash"


def test_complete_shard_is_not_run_again_unless_the_limit_grows(tmp_path):
    cfg = config(tmp_path, "data.limit=10", "shard.index=0", "shard.count=2")
    run_generation(cfg, make_engine=fake_factory()[1])
    manifest_path = output_dir(cfg) / MANIFEST_NAME
    before = manifest_path.read_bytes()
    engines, make = fake_factory()
    stats = run_generation(cfg, make_engine=make)
    assert engines == [] and stats.complete and stats.skipped_rows == 5, "no model loaded"
    assert manifest_path.read_bytes() == before, "the completion marker is left as it was"
    stats = run_generation(
        config(tmp_path, "data.limit=4", "shard.index=0", "shard.count=2"), make_engine=make
    )
    assert engines == [] and stats.complete, "a smaller limit is covered"
    grown = config(tmp_path, "data.limit=14", "shard.index=0", "shard.count=2")
    stats = run_generation(grown, make_engine=make)
    assert len(engines) == 1 and stats.skipped_rows == 5 and stats.source_rows == 2
    assert Manifest.load(manifest_path).attempts == 2


def test_resume_with_a_different_shard_map_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"prompt": f"a{i}"} for i in range(6)])
    args = ["data=jsonl", f"data.path={data}", "shard.index=1", "shard.count=2"]
    cfg = config(tmp_path, *args, "data.limit=4")
    run_generation(cfg, make_engine=fake_factory()[1])
    recorded = Manifest.load(output_dir(cfg) / MANIFEST_NAME).shard_map
    assert recorded["rule"] == "row_index % count == index" and (recorded["index"], recorded["count"]) == (
        1,
        2,
    )
    assert recorded["files"] == 1
    write_jsonl(data / "0.jsonl", [{"prompt": "new"}])  # sorts first: every row index moves by one
    engines, make = fake_factory()
    with pytest.raises(
        JobError, match=r"different shard map \(files: 1 -> 2; files_sha256: .*overwrite=true"
    ):
        run_generation(config(tmp_path, *args), make_engine=make)
    assert engines == [], "refused before the model loads"
    run_generation(config(tmp_path, *args, "overwrite=true"), make_engine=make)
    assert sorted(r["row_index"] for r in read_rows(output_dir(cfg))) == [1, 3, 5]


def test_launcher_check_sees_complete_shards_only_when_named_and_unchanged(tmp_path, monkeypatch):
    args = ["data.limit=6", "shard.index=1", "shard.count=2"]
    assert not is_complete(config(tmp_path, *args))
    run_generation(config(tmp_path, *args), make_engine=fake_factory()[1])
    assert is_complete(config(tmp_path, *args))
    assert not is_complete(config(tmp_path, *args[:1], "shard.index=0", "shard.count=2"))
    assert not is_complete(config(tmp_path, *args, "job.sampling.temperature=0.1")), "config changed"
    assert not is_complete(config(tmp_path, *args, "overwrite=true"))
    assert not is_complete(config(tmp_path, "data.limit=8", *args[1:])), "more rows asked"
    for name, value in array(1, 0, 1).items():
        monkeypatch.setenv(name, value)
    assert not is_complete(config(tmp_path, "data.limit=6")), (
        "a shard from Slurm's variables is the task's to decide"
    )
    distill_args = ["job=distill", "job.sampling.logprobs=false", *args]
    run_generation(config(tmp_path, *distill_args), make_engine=fake_factory()[1])  # not distill's own params
    assert not is_complete(config(tmp_path, *distill_args))
    distill.run(config(tmp_path, *distill_args, "overwrite=true"), make_engine=fake_factory()[1])
    assert is_complete(config(tmp_path, *distill_args)), "the job's own sampling (logprobs on) is what counts"


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2])
def test_preemption_signal_stops_admitting_and_commits(tmp_path, signum):
    cfg = config(tmp_path, "checkpoint.rows=3")

    def preempt_at_step_30(engine):
        if engine.steps == 30:
            os.kill(os.getpid(), signum)

    with pytest.raises(Interrupted) as err:
        run_generation(cfg, make_engine=fake_factory(max_num_seqs=4, on_step=preempt_at_step_30)[1])
    assert err.value.exit_code == 128 + signum
    manifest = Manifest.load(output_dir(cfg) / MANIFEST_NAME)
    assert not manifest.complete and 0 < manifest.rows < 50
    stats = run_generation(cfg, make_engine=fake_factory(max_num_seqs=4)[1])
    assert stats.complete and stats.skipped_rows == manifest.sources
    assert len(rows_by_custom_id(read_rows(output_dir(cfg)))) == 50


def test_preempted_submitit_task_is_handed_to_submitits_requeue_handler(monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        requeue.hand_over(signal.SIGUSR1, {})
        requeue.hand_over(signal.SIGTERM, {"SUBMITIT_EXECUTOR": "slurm"})
        assert calls == [], "outside submitit, or on SIGTERM (Slurm's cancel too): nothing to hand over"
        requeue.hand_over(signal.SIGUSR1, {"SUBMITIT_EXECUTOR": "slurm"})
        requeue.hand_over(signal.SIGUSR2, {"SUBMITIT_EXECUTOR": "local"})
        assert calls == [signal.SIGUSR2, signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)

"""Data parallel on one node (``data_parallel=N|auto``): which GPU each worker gets, failures, signals
(fake workers), and with the real engine on CPU: two workers write exactly the rows of one run into one
run directory that ``job=merge`` accepts; a killed worker fails the run by name and a re-run finishes
only what is missing."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import merge
from jobs.errors import JobError
from jobs.pipeline.manifest import MANIFEST_NAME, Manifest
from jobs.pipeline.shards import shard_subdir
from jobs_helpers import compose_config, read_rows, rows_by_custom_id, single_run_rows
from launch import data_parallel as dp

RUN = Path("synthetic_data") / "tiny-chat-tiny-prompts"
SETTINGS = ["job=synthetic_data", "data.limit=12", "engine.max_num_seqs=2", "checkpoint.rows=2"]


# --- which GPU each worker gets -------------------------------------------------------------------------


def test_visible_devices_follow_cuda_visible_devices():
    assert dp.visible_devices({}, cuda_count=0) == []
    assert dp.visible_devices({}, cuda_count=3) == ["0", "1", "2"]
    assert dp.visible_devices({"CUDA_VISIBLE_DEVICES": "4,6"}, cuda_count=2) == ["4", "6"]
    assert dp.visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}, cuda_count=2) == [
        "GPU-aa",
        "GPU-bb",
    ]
    assert dp.visible_devices({"CUDA_VISIBLE_DEVICES": ""}, cuda_count=0) == []
    # CUDA stops at an invalid entry: only the devices it reports are visible
    assert dp.visible_devices({"CUDA_VISIBLE_DEVICES": "2,-1,3"}, cuda_count=1) == ["2"]


def test_worker_count_and_assignment():
    assert dp.worker_count("auto", ["3", "5", "7"]) == 3
    assert dp.worker_count("auto", []) == 1
    assert dp.worker_count("2", []) == 2  # N workers on CPU
    assert dp.assign_devices(2, ["3", "5", "7"]) == ["3", "5"]
    assert dp.assign_devices(2, []) == [None, None]
    with pytest.raises(JobError, match="needs 4 GPUs but 3 are visible"):
        dp.assign_devices(4, ["3", "5", "7"])
    for bad in ("0", "-1", "two"):
        with pytest.raises(JobError, match="data_parallel must be auto or a positive"):
            dp.worker_count(bad, [])


def test_tensor_parallel_workers_get_a_group_of_gpus_each():
    gpus = ["0", "1", "2", "3", "4"]
    assert dp.worker_count("auto", gpus, per_worker=2) == 2
    assert dp.worker_count("auto", ["0"], per_worker=2) == 1  # the engine then names the missing GPU
    assert dp.assign_devices(2, gpus, per_worker=2) == ["0,1", "2,3"]
    with pytest.raises(JobError, match=r"data_parallel=3 x engine.tensor_parallel_size=2 needs 6 GPUs but 5"):
        dp.assign_devices(3, gpus, per_worker=2)


def test_worker_env_and_overrides():
    env = dp.worker_env({"CUDA_VISIBLE_DEVICES": "3,5", "A": "1"}, "5", 2)
    assert env == {"CUDA_VISIBLE_DEVICES": "5", "A": "1"}
    assert dp.worker_env({}, None, 4, cpus=16) == {"OMP_NUM_THREADS": "4"}
    assert dp.worker_env({"OMP_NUM_THREADS": "1"}, None, 4, cpus=16) == {"OMP_NUM_THREADS": "1"}
    args = dp.worker_overrides(["job=distill", "data_parallel=auto", "shard=single", "data.limit=5"], 1, 2)
    assert args == [
        "job=distill",
        "data.limit=5",
        "data_parallel=1",
        "shard.index=1",
        "shard.count=2",
        "runner.progress=false",
    ]


def test_data_parallel_1_runs_in_process_and_auto_without_gpus_too(tmp_path):
    cfg = compose_config([f"output_root={tmp_path}"])
    assert cfg.data_parallel == "1" and dp.workers(cfg) == 1
    auto = compose_config([f"output_root={tmp_path}", "data_parallel=auto"])
    assert dp.workers(auto, {"CUDA_VISIBLE_DEVICES": ""}) == 1
    assert dp.workers(compose_config([f"output_root={tmp_path}", "data_parallel=3"])) == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["shard.count=2", "shard.index=0"], "leave shard.index and shard.count unset"),
        (["job=merge", "run_dir=x"], "applies to generation jobs"),
    ],
)
def test_refused_settings(tmp_path, overrides, message):
    cfg = compose_config([f"output_root={tmp_path}", "data_parallel=2", *overrides])
    with pytest.raises(JobError, match=message):
        dp.launch(cfg, [], env={}, devices=[])


def test_refuses_a_run_dir_of_another_split(tmp_path):
    cfg = compose_config([f"output_root={tmp_path}", "data_parallel=2"])
    (Path(cfg.run_dir) / shard_subdir(0, 3)).mkdir(parents=True)
    with pytest.raises(JobError, match="another split"):
        dp.launch(cfg, [], env={}, devices=[])


# --- fake workers: GPU assignment, failure, signal forwarding --------------------------------------------

FAKE_WORKER = """
import json, os, signal, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:])
folder = os.path.join(os.environ["FAKE_ROOT"], args["shard.index"])
os.makedirs(folder, exist_ok=True)
def stop(signum, frame):
    open(os.path.join(folder, "signal"), "w").write(str(signum))
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
json.dump({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "args": sys.argv[1:]}, open(os.path.join(folder, "w.json"), "w"))
print("worker", args["shard.index"], "started", flush=True)
mode = os.environ["FAKE_MODE"]
if mode == "fail" and args["shard.index"] == "1":
    print("boom: out of memory", flush=True)
    sys.exit(3)
if mode == "wait":
    time.sleep(60)
"""


def fake_launch(tmp_path, mode, devices, caplog, data_parallel="auto"):
    cfg = compose_config([f"output_root={tmp_path}", f"data_parallel={data_parallel}"])
    env = os.environ | {"FAKE_ROOT": str(tmp_path / "fake"), "FAKE_MODE": mode, "CUDA_VISIBLE_DEVICES": "x"}
    out = io.StringIO()
    caplog.set_level(logging.INFO, logger="launch.data_parallel")
    status = dp.launch(
        cfg,
        ["data.limit=3", "data_parallel=auto"],
        env=env,
        devices=devices,
        out=out,
        progress_seconds=0.2,
        command=lambda args: [sys.executable, "-c", FAKE_WORKER, *args],
    )
    return status, out.getvalue()


def worker_record(tmp_path, index) -> dict:
    return json.loads((tmp_path / "fake" / str(index) / "w.json").read_text())


def test_each_worker_gets_the_ith_visible_gpu_and_its_shard(tmp_path, caplog):
    status, out = fake_launch(tmp_path, "ok", ["GPU-a", "GPU-b", "GPU-c"], caplog)
    assert status == 0, out
    for i, gpu in enumerate(["GPU-a", "GPU-b", "GPU-c"]):
        record = worker_record(tmp_path, i)
        assert record["cvd"] == gpu
        assert record["args"] == [
            "data.limit=3",
            "data_parallel=1",
            f"shard.index={i}",
            "shard.count=3",
            "runner.progress=false",
        ]
        assert f"[shard {i}] worker {i} started" in out
    assert "0/3 workers running" in caplog.text


def test_a_failed_worker_fails_the_run_by_name(tmp_path, caplog):
    status, out = fake_launch(tmp_path, "fail", [], caplog, data_parallel="2")
    assert status == dp.EXIT_WORKER_FAILED
    assert "1 of 2 workers failed: shard 1 (shard-00001-of-00002)" in caplog.text
    assert "exit status 3" in caplog.text and "boom: out of memory" in caplog.text
    assert worker_record(tmp_path, 0)["cvd"] == "x"  # on CPU the environment is inherited


def test_sigterm_is_forwarded_to_the_workers(tmp_path, caplog):
    def signal_when_started():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all((tmp_path / "fake" / str(i) / "w.json").exists() for i in range(2)):
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=signal_when_started, daemon=True).start()
    status, out = fake_launch(tmp_path, "wait", ["0", "1"], caplog)
    assert status == 143, out
    for i in range(2):
        assert (tmp_path / "fake" / str(i) / "signal").read_text() == str(int(signal.SIGTERM))
    assert "interrupted by SIGTERM, forwarded to the workers" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are restored


# --- the real engine on CPU ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, models_dir) -> dict[str, dict]:
    """The rows of one unsplit run, keyed by custom_id (materialises the built-in model for the workers)."""
    rows = single_run_rows(tmp_path_factory.mktemp("single"), models_dir, SETTINGS)
    assert len(rows) == 24
    return rows


def dp_args(root, models_dir, n=2) -> list[str]:
    return [*SETTINGS, f"data_parallel={n}", f"output_root={root}", f"models_dir={models_dir}"]


def shard_manifest(root, index, count=2) -> Manifest | None:
    try:
        return Manifest.load(root / RUN / shard_subdir(index, count) / MANIFEST_NAME)
    except JobError:  # being written
        return None


def all_rows(root, count=2) -> dict[str, dict]:
    rows = []
    for index in range(count):
        part = read_rows(root / RUN / shard_subdir(index, count))
        assert {r["row_index"] % count for r in part} <= {index}
        rows += part
    return rows_by_custom_id(rows)


def test_killed_worker_fails_the_run_and_a_rerun_finishes_only_it_then_merge_accepts_the_run(
    tmp_path, models_dir, single_run, preloaded_cli
):
    """Two workers, worker 1 killed mid-run: the run fails naming it; the same command finishes only it, the
    two shards then hold exactly the rows of a single run in one run directory, and job=merge accepts it."""
    parent = preloaded_cli.start(dp_args(tmp_path, models_dir))
    try:
        log = tmp_path / RUN / shard_subdir(1, 2) / "run.log"
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and parent.poll() is None, "worker 1 committed nothing in time"
            m = shard_manifest(tmp_path, 1)
            pids = re.findall(r"pid (\d+)", log.read_text()) if log.exists() else []
            if pids and m is not None and m.rows >= 2:
                pid = int(pids[-1])
                os.kill(pid, signal.SIGSTOP)
                if shard_manifest(tmp_path, 1).complete:
                    pytest.fail("worker 1 finished before it could be killed")
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        _, err = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.communicate()
    assert parent.returncode == dp.EXIT_WORKER_FAILED, err
    assert "1 of 2 workers failed: shard 1 (shard-00001-of-00002)" in err
    assert "killed by SIGKILL" in err and "| 0/2 workers running" in err
    killed, done = shard_manifest(tmp_path, 1), shard_manifest(tmp_path, 0)
    assert not killed.complete and 0 < killed.rows < 12
    assert done.complete and done.attempts == 1
    with pytest.raises(JobError, match="not complete"):
        merge.require_complete(tmp_path / RUN)
    again = preloaded_cli.run(dp_args(tmp_path, models_dir), timeout=180)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("complete, not launched") == 1
    assert "shard 0 (shard-00000-of-00002) complete, not launched" in again.stderr
    assert "12/12 (100%) source rows committed, 24 rows | 0/1 workers running" in again.stderr
    assert shard_manifest(tmp_path, 0) == done, "the finished shard is untouched"
    resumed = shard_manifest(tmp_path, 1)
    assert resumed.complete and resumed.attempts == 2
    assert all_rows(tmp_path) == single_run
    assert sorted(p.name for p in (tmp_path / RUN).iterdir() if p.name.startswith("shard-")) == [
        shard_subdir(i, 2) for i in range(2)
    ]
    check = merge.run(compose_config(["job=merge", f"run_dir={tmp_path / RUN}"]))
    assert check.rows == 24 and (tmp_path / RUN / merge.CARD_NAME).exists()
    assert rows_by_custom_id(merge.load_run(tmp_path / RUN).to_list()) == single_run
    third = preloaded_cli.run(dp_args(tmp_path, models_dir), timeout=120)
    assert third.returncode == 0 and third.stderr.count("complete, not launched") == 2, third.stderr
    assert [shard_manifest(tmp_path, i) for i in range(2)] == [done, resumed], "complete shards are not run"

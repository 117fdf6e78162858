"""Slurm without a cluster: the launcher config composes, submitit's sbatch script asks for what was configured,
and the shipped array script requeues a task stopped before its time limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from jobs_helpers import ROOT, run_cli

SBATCH_SCRIPT = ROOT / "scripts" / "slurm_array.sbatch"


def fake_command(bin_dir: Path, name: str, body: str) -> None:
    """An executable ``name`` in ``bin_dir`` running the bash ``body``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def test_slurm_launcher_config_composes():
    proc = run_cli(["--cfg", "job", "hydra/launcher=slurm"])
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["job"]["name"] == "synthetic_data" and job["shard"] == {"index": None, "count": None}
    proc = run_cli(["--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    assert proc.returncode == 0, proc.stderr
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.batchgen_launcher.launchers.SlurmLauncher"
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1
    assert {"account", "qos", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism"} <= set(launcher)
    assert launcher["signal_delay_s"] > 0 and launcher["max_num_timeout"] > 0


def test_submitit_sbatch_script_asks_for_the_configured_resources(tmp_path):
    """The real multirun through Hydra's submitit launcher, with an ``sbatch`` that keeps the script and refuses."""
    bin_dir = tmp_path / "bin"
    fake_command(
        bin_dir, "sbatch", f'cp "$1" {tmp_path}/submitted.sh; echo "sbatch: no cluster here" >&2; exit 1'
    )
    fake_command(bin_dir, "srun", "exit 1")  # submitit looks for it before submitting
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            "job=synthetic_data",
            "shard.count=4",
            "shard.index=range(4)",
            "hydra/launcher=slurm",
            f"output_root={tmp_path}/out",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=proj",
            "hydra.launcher.qos=high",
            "hydra.launcher.cpus_per_task=6",
            "hydra.launcher.mem_gb=40",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.array_parallelism=2",
        ],
        cwd=ROOT,
        env=os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "no cluster here" in proc.stdout + proc.stderr
    script = (tmp_path / "submitted.sh").read_text()
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --mem=40GB",
        "#SBATCH --time=90",
        "#SBATCH --array=0-3%2",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --job-name=batchgen-synthetic_data",
    ]:
        assert line in script.splitlines(), line
    run_dir = tmp_path / "out" / "synthetic_data" / "tiny-chat-tiny-prompts"
    assert f"{run_dir}/.submitit/%A_%a" in script, "submitit's logs in the one run directory"
    assert "submitit.core._submit" in script


def run_array_script(tmp_path, status: int) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "srun", f'echo "$@" > {tmp_path}/srun.args; exit {status}')
    fake_command(bin_dir, "scontrol", f'echo "$@" >> {tmp_path}/scontrol.args')
    env = os.environ | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "1234",
        "SLURM_ARRAY_JOB_ID": "1200",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    proc = subprocess.run(
        ["bash", str(SBATCH_SCRIPT), "job=synthetic_data", "data.limit=8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    requeued = tmp_path / "scontrol.args"
    return proc, requeued.read_text() if requeued.exists() else ""


def test_shipped_array_script_requeues_only_a_task_stopped_before_its_time_limit(tmp_path):
    proc, requeued = run_array_script(tmp_path / "usr1", 138)
    assert proc.returncode == 138 and requeued == "requeue 1200_3\n"
    assert (tmp_path / "usr1" / "srun.args").read_text() == "python run.py job=synthetic_data data.limit=8\n"
    proc, requeued = run_array_script(tmp_path / "done", 0)
    assert proc.returncode == 0 and requeued == ""
    proc, requeued = run_array_script(tmp_path / "cancelled", 143)
    assert proc.returncode == 143 and requeued == "", "SIGTERM: scancel or preemption, which Slurm requeues"
    header = SBATCH_SCRIPT.read_text()
    assert "#SBATCH --signal=USR1@120" in header and "#SBATCH --gpus-per-node=1" in header

"""The Hydra config tree: defaults, deterministic run directories, and clear errors before any model loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from jobs import cli
from jobs.cli import register_configs
from jobs.config import GenerationJobConfig, SourceFormat, path_name
from jobs.errors import JobError, JobExit
from jobs_helpers import CONF_DIR, ROOT, cli_env, compose_config, run_cli


def compose_raw(overrides, hydra_config=False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def test_default_is_synthetic_data_on_the_tiny_model_and_shipped_prompts():
    cfg = compose_config([])
    assert cfg.job.name == "synthetic_data" and isinstance(cfg.job, GenerationJobConfig)
    assert isinstance(cfg.job.sampling, SamplingParams) and isinstance(cfg.engine, EngineConfig)
    assert cfg.model.builtin == "tiny_chat" and cfg.data.path == "jobs/assets/prompts.jsonl"
    assert cfg.data.format is SourceFormat.jsonl
    assert (cfg.shard.index, cfg.shard.count) == (None, None), "from Slurm's variables, else 0 of 1"
    assert cfg.run_dir == "outputs/synthetic_data/tiny-chat-tiny-prompts"


def test_run_dir_is_deterministic_and_hydra_writes_there_without_chdir():
    raw = compose_raw(["run_dir=/data/runs/x"], hydra_config=True)
    assert raw.hydra.run.dir == "/data/runs/x" and raw.hydra.job.chdir is False
    raw = compose_raw([], hydra_config=True)
    assert raw.hydra.run.dir == "outputs/synthetic_data/tiny-chat-tiny-prompts"


def test_distill_reads_chat_messages_unless_data_is_overridden():
    cfg = compose_config(["job=distill"])
    assert cfg.data.messages_column == "messages" and cfg.job.sampling.logprobs
    assert compose_config(["job=distill", "data=tiny_prompts"]).data.name == "tiny-prompts"


def test_real_checkpoint_names_its_run_after_the_model():
    cfg = compose_config(["model=hf", "model.model=Qwen/Qwen3-0.6B", "model.dtype=bfloat16"])
    assert cfg.model.name == "Qwen3-0.6B" and cfg.model.builtin is None
    assert cfg.run_dir == "outputs/synthetic_data/Qwen3-0.6B-tiny-prompts"


@pytest.mark.parametrize(
    "override,message",
    [
        ("job.sampling.temperatur=0.5", "job.sampling.temperatur"),
        ("enigne.max_num_seqs=8", "enigne"),
        ("job.sampling.n=two", "two"),
        ("engine.max_num_seqs=1.5", "1.5"),
        ("data.format=csv", "csv"),
        ("checkpoint.rows=many", "many"),
    ],
)
def test_typo_or_wrong_type_is_refused_at_composition(override, message):
    with pytest.raises(ConfigCompositionException) as err:
        compose_raw([override])
    assert message in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "override,message",
    [
        ("job.sampling.temperature=-1", "temperature must be >= 0"),
        ("job.sampling.top_p=0", "top_p must be in (0, 1]"),
        ("engine.mode=fast", "mode must be one of auto, sync, async"),
    ],
)
def test_invalid_values_are_refused_before_the_model_loads(override, message):
    with pytest.raises(JobError, match="invalid config") as err:
        compose_config([override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+job.sampling.temperatur=1", "job.sampling.temperatur (did you mean job.sampling.temperature?)"),
        ("+engine.max_num_seq=2", "engine.max_num_seq (did you mean engine.max_num_seqs?)"),
        ("+data.prompt_colum=text", "data.prompt_colum (did you mean data.prompt_column?)"),
        ("+outptu_root=/tmp", "outptu_root (did you mean output_root?)"),
    ],
)
def test_a_key_added_with_plus_is_refused_when_the_schema_lacks_it(override, message):
    with pytest.raises(JobError, match="unknown config key") as err:
        compose_config([override])
    assert message in str(err.value)


def test_benchmark_without_a_bench_names_the_choices(capsys):
    assert cli.main(compose_raw(["job=benchmark"])) == cli.EXIT_ERROR
    from bench.workloads import WORKLOADS

    assert f"choose a benchmark: bench=<{'|'.join(WORKLOADS)}|job>" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [
        ("job.sampling.temperatur=0.5", "Could not override 'job.sampling.temperatur'"),
        ("job.prompt.template=Write a {style}", "mismatched input '{'"),
    ],
)
def test_cli_typo_exits_with_status_2_before_loading_anything(tmp_path, override, message):
    """Hydra's own errors (a key the schema lacks, the override grammar) are errors at start: status 2."""
    proc = run_cli([override, f"output_root={tmp_path}"])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "_models").exists() and not (tmp_path / "synthetic_data").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data=jsonl"], "error: data.path is not set: add data.path=<a file, folder or glob"),
        (
            ["model=hf"],
            "error: model.model is not set: add model.model=<a hub id or a local checkpoint folder>",
        ),
        (
            ["job=merge"],
            "error: job=merge needs the run to read: python run.py job=merge run_dir=outputs/<job>/<run>",
        ),
        (["job=report"], "error: job=report needs the run to read"),
        (["data=jsonl", "data.path=/nonexistent/x.jsonl"], "error: data.path: no such file or directory"),
    ],
)
def test_a_required_value_left_unset_is_one_line_exit_2_and_leaves_no_folder(tmp_path, overrides, message):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "run.py", *overrides, f"output_root={out}", "runner.progress=false"],
        cwd=ROOT,
        env=cli_env() | {"TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    assert not out.exists() and not list(scratch.iterdir()), "a failed start leaves no folder behind"


def test_a_failed_start_in_an_existing_folder_writes_its_error_into_run_log(tmp_path):
    folder = tmp_path / "not-a-run"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    proc = run_cli(["job=merge", f"run_dir={folder}"])
    assert proc.returncode == 2 and f"error: no run in {folder}" in proc.stderr
    assert f"error: no run in {folder}" in (folder / "run.log").read_text()


def test_status_1_becomes_2_only_for_hydras_own_errors_at_start():
    assert cli.exit_status(SystemExit(1), started=False) == cli.EXIT_ERROR, "Hydra's error before the job"
    assert cli.exit_status(SystemExit(1), started=True) == 1, "a crash inside the job"
    assert cli.exit_status(JobExit(1), started=False) == 1, (
        "a failed task of a multirun: the job's own status"
    )
    assert cli.exit_status(SystemExit(0), started=False) == 0


def test_invalid_value_exits_with_status_2_and_a_message(tmp_path, capsys):
    assert cli.main(compose_raw(["job.sampling.temperature=-2", f"output_root={tmp_path}"])) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "error: invalid config" in err and "temperature must be >= 0" in err
    assert not (tmp_path / "_models").exists(), "no model was built or loaded"


@pytest.mark.parametrize(
    "path,name",
    [
        ("Qwen/Qwen3-0.6B", "Qwen3-0.6B"),
        ("/ckpt/llama-3-8b/", "llama-3-8b"),
        ("data/*.parquet", "data"),
        ("/x/batch.jsonl", "batch"),
        ("prompts.jsonl.gz", "prompts"),
        ("*.parquet", "data"),
    ],
)
def test_run_names_from_paths_are_folder_safe(path, name):
    assert path_name(path) == name


def test_data_groups_name_the_run_after_the_source():
    cfg = compose_config(["data=parquet", "data.path=/d/shards/*.parquet"])
    assert (
        cfg.data.format is SourceFormat.parquet and cfg.run_dir == "outputs/synthetic_data/tiny-chat-shards"
    )
    cfg = compose_config(["data=openai_batch", "data.path=requests.jsonl"])
    assert cfg.data.id_column == "custom_id" and cfg.data.name == "requests"


def test_the_job_runs_the_engines_own_defaults():
    from engine.config import EngineConfig

    assert compose_config(["job=synthetic_data"]).engine == EngineConfig()
    tuned = compose_config(["job=synthetic_data", "engine.max_num_seqs=512"]).engine
    assert tuned == EngineConfig(max_num_seqs=512)

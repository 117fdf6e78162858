"""Every ``python run.py`` command in the README's bash blocks runs as printed, on the built-in model.

Each runs in this process as Hydra would: its arguments split as the shell splits them, composed by
Hydra (the override grammar and the schemas), Hydra's output folders resolved, then the job run through
``jobs.cli.main``, with ``data.limit=2``, ``overwrite=true`` and a temporary ``output_root`` (a path
under ``outputs/`` is moved there). The commands run in README order, so ``job=merge`` and ``job=report``
read the runs written before them. Commands that need what a test machine lacks are skipped by name.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from jobs import cli
from jobs_helpers import CONF_DIR, ROOT, read_rows

README = ROOT / "README.md"
# A part of the command -> why it is not run here.
SKIPPED = {
    "model=hf": "downloads a hub model and dataset",
    "hydra/launcher=slurm": "needs a Slurm cluster",
}
GENERATION_JOBS = ("synthetic_data", "distill")


def readme_commands(text: str) -> list[str]:
    """The ``python run.py ...`` commands of the bash blocks of ``text``, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("python run.py"):
                commands.append(" ".join(line.split()))
    return commands


COMMANDS = readme_commands(README.read_text())


def skip_reason(command: str) -> str | None:
    return next((why for part, why in SKIPPED.items() if part in command), None)


def test_the_readme_commands_are_found_and_every_skip_names_one():
    assert len(COMMANDS) >= 10 and COMMANDS[0] == "python run.py job=synthetic_data"
    for part in SKIPPED:
        assert any(part in c for c in COMMANDS), f"{part!r} skips no README command: remove it"
    assert sum(skip_reason(c) is None for c in COMMANDS) >= 8


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize(
    "command", COMMANDS, ids=[c.removeprefix("python run.py ").split(" #")[0].strip() for c in COMMANDS]
)
def test_readme_command_runs_as_printed(command, root, models_dir, capsys):
    import torch

    if skip_reason(command):
        pytest.skip(skip_reason(command))
    args = shlex.split(command, comments=True)[2:]
    print_cfg = "--cfg" in args
    if print_cfg:  # --cfg job|hydra|all: print the config and exit
        del args[args.index("--cfg") : args.index("--cfg") + 2]
    assert not [a for a in args if a.startswith("-")], f"a flag this test does not run: {command}"
    overrides = [re.sub(r"=outputs/", f"={root}/", a) for a in args]
    overrides += [f"output_root={root}", f"models_dir={models_dir}", "runner.progress=false"]
    cli.register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.run.dir and cfg.hydra.sweep.dir, "Hydra's output folders resolve"
    with open_dict(cfg):
        del cfg["hydra"]
    if print_cfg:
        assert "job:" in OmegaConf.to_yaml(cfg)
        return
    if cfg.job.name in GENERATION_JOBS:
        with open_dict(cfg):
            cfg.data.limit, cfg.overwrite = 2, True
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status = cli.main(cfg)
    finally:
        torch.set_num_threads(before)
    assert status == 0, capsys.readouterr().err
    if cfg.job.name in GENERATION_JOBS:
        rows = read_rows(Path(cfg.run_dir))
        assert len(rows) == 2 * cfg.job.sampling.n and all(r["error"] is None for r in rows), rows[0]["error"]

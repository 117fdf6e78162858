"""Command line entry point: ``python run.py job=synthetic_data [group=option ...] [key=value ...]``."""

import sys

import hydra
from omegaconf import DictConfig

from jobs.cli import exit_status, register_configs
from jobs.cli import main as run_job
from jobs.errors import JobExit

register_configs()
_started = []  # set once the job itself runs: Hydra's status 1 after that is a crash, not an error at start


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Compose the config, run the job, exit with its status."""
    _started.append(True)
    status = run_job(cfg)
    if status:
        raise JobExit(status)


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        sys.exit(exit_status(e, started=bool(_started)))

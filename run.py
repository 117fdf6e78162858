"""Command line entry point: ``python run.py job=synthetic_data [group=option ...] [key=value ...]``."""

import sys

import hydra
from omegaconf import DictConfig

from jobs.cli import main as run_job
from jobs.cli import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Compose the config, run the job, exit with its status."""
    status = run_job(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()

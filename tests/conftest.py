"""Shared test set-up. The helper modules beside this file (``tiny_models``, ``engine_helpers``,
``jobs_helpers``) are importable from every test folder (``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """One folder for the built-in models of the whole session: each is written once, then loaded."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def preloaded_cli(tmp_path_factory):
    """``python run.py`` started without re-importing torch each time (``jobs_helpers.PreloadedCli``)."""
    from jobs_helpers import PreloadedCli

    cli = PreloadedCli(tmp_path_factory.mktemp("cli-runs"))
    yield cli
    cli.close()

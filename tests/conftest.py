"""Shared test set-up. The helper modules beside this file (``tiny_models``, ``engine_helpers``,
``jobs_helpers``) are importable from every test folder (``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: absent without it
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject.toml): two worker processes on a CPU machine (the suite is mostly
    single-threaded Python and subprocesses, so two cores run it about twice as fast); none on a
    CUDA machine, where the tests would share one GPU."""
    import torch

    if torch.cuda.is_available():
        return 0
    return min(2, os.cpu_count() or 1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    """One folder for the built-in models of the whole session: each is written once, then loaded."""
    return tmp_path_factory.mktemp("models")

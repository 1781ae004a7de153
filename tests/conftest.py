"""Shared fixtures: one tiny trained run per test session (tokenizers + a few LM steps)."""

from __future__ import annotations

import pytest
import torch

from nmm.config import load_config

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory trained with the shapes-tiny preset (shared, treat as read-only)."""
    from nmm.train.trainer import train

    run_dir = tmp_path_factory.mktemp("tiny_run")
    train(load_config("shapes-tiny"), run_dir, show_progress=False, log=lambda *a: None)
    return run_dir


@pytest.fixture(scope="session")
def tiny_pipe(tiny_run):
    import nmm

    return nmm.load(tiny_run)

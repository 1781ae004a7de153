"""Shared fixtures (one tiny trained run per test session) and the CI rule on skips.

With CI=true a skipped test is a failure: a skip means a feature went untested. The only allowed
skips are tests marked for hardware the machine cannot have (`@pytest.mark.gpu`); they are listed
at the end of the run with their reasons.
"""

from __future__ import annotations

import os

import pytest
import torch

from nmm.config import load_config

torch.set_num_threads(2)

HARDWARE_MARKERS = ("gpu",)
_ALLOWED = pytest.StashKey[list]()  # (nodeid, marker, reason) of allowed skips
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _hardware_marker(item) -> str | None:
    return next((m for m in HARDWARE_MARKERS if item.get_closest_marker(m)), None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    marker = _hardware_marker(item)
    if marker:
        item.config.stash.setdefault(_ALLOWED, []).append((item.nodeid, marker, _skip_reason(report)))
    elif IN_CI:
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI, which must run every test: {_skip_reason(report)}\n"
                           f"(only tests marked {', '.join('@pytest.mark.' + m for m in HARDWARE_MARKERS)} may skip)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A whole module skipped at import (pytest.skip(allow_module_level=True)) is a skip too.
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"module skipped in CI, which must run every test: {_skip_reason(report)}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    allowed = config.stash.get(_ALLOWED, [])
    if allowed:
        terminalreporter.section("allowed skips (hardware this machine does not have)")
        for nodeid, marker, reason in allowed:
            terminalreporter.write_line(f"{nodeid} [{marker}]: {reason}")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory trained with the shapes-tiny preset (shared, treat as read-only)."""
    from nmm.train.trainer import train

    run_dir = tmp_path_factory.mktemp("tiny_run")
    train(load_config("shapes-tiny"), run_dir, show_progress=False, log=lambda *a: None)
    return run_dir


CODEC_FILES = ("vocab.json", "text_tokenizer.json", "image_tokenizer.json", "image_tokenizer.safetensors",
               "tokenizer_stats.json")


@pytest.fixture(scope="session")
def with_codecs(tiny_run):
    """with_codecs(path) -> a new run directory holding tiny_run's trained tokenizers, so only the
    language model trains in it."""
    import shutil

    def make(run_dir):
        run_dir.mkdir(parents=True)
        for name in CODEC_FILES:
            if (tiny_run / name).exists():
                shutil.copy(tiny_run / name, run_dir / name)
        return run_dir

    return make


@pytest.fixture(scope="session")
def tiny_pipe(tiny_run):
    import nmm

    return nmm.load(tiny_run)


@pytest.fixture(scope="session")
def speech_run(tmp_path_factory):
    """A run directory trained with the speech-tiny preset: text <-> speech (shared, read-only)."""
    from nmm.train.trainer import train

    run_dir = tmp_path_factory.mktemp("speech_run")
    train(load_config("speech-tiny"), run_dir, show_progress=False, log=lambda *a: None)
    return run_dir


@pytest.fixture(scope="session")
def speech_pipe(speech_run):
    import nmm

    return nmm.load(speech_run)

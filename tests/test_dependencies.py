"""What the README's commands install is what the code and the tests import.

A module that is imported but not declared in pyproject.toml passes on a machine where someone
installed it by hand and fails (or used to skip) on a fresh one, so these tests fail loudly instead.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFTEST = Path(__file__).with_name("conftest.py")


def imported_modules(*folders: str) -> dict[str, str]:
    """Top-level third-party modules imported anywhere under the folders -> first file importing it."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    local = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {"nmm", "conftest"}
    return {m: f for m, f in found.items() if m not in sys.stdlib_module_names and m not in local}


def requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared_closure() -> set[str]:
    """Distributions that `pip install -e ".[dev]"` brings in: declared ones and their requirements."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [requirement_name(r) for r in project["dependencies"]]
    todo += [requirement_name(r) for extra in project["optional-dependencies"].values() for r in extra]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [requirement_name(r) for r in metadata.requires(name) or [] if "extra ==" not in r]
        except metadata.PackageNotFoundError:
            pass
    return seen


MODULES = imported_modules("src", "tests", "benchmarks")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_imported_module_is_installed_and_declared(module):
    where = MODULES[module]
    assert importlib.util.find_spec(module) is not None, f"{where} imports {module!r}, which is not installed"
    dists = {d.lower().replace("_", "-") for d in metadata.packages_distributions().get(module, [])}
    assert dists, f"{where} imports {module!r}, which no installed distribution provides"
    assert dists & declared_closure(), (
        f"{where} imports {module!r} (from {', '.join(sorted(dists))}), which pyproject.toml does not declare: "
        "a fresh `pip install -e \".[dev]\"` would not install it")


def test_a_skip_fails_in_ci_unless_marked_for_missing_hardware(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "def test_plain_skip(): pytest.skip('feature X not installed')\n"
        "@pytest.mark.gpu\n"
        "def test_gpu(): pytest.skip('no CUDA device')\n"
        "def test_runs(): pass\n")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
            "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    ci = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env={**env, "CI": "true"}, timeout=120)
    assert ci.returncode == 1, ci.stdout
    assert "1 failed, 1 passed, 1 skipped" in ci.stdout
    assert "skipped in CI" in ci.stdout and "feature X not installed" in ci.stdout
    assert "test_gpu [gpu]: Skipped: no CUDA device" in ci.stdout  # the allowed skip is listed with its reason
    local = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert local.returncode == 0 and "1 passed, 2 skipped" in local.stdout, local.stdout

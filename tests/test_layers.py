"""The import contracts of pyproject.toml ([tool.importlinter]): one-way layers, checked by import-linter.

The core (serve, api, infer, train, data sources, model, modalities, config and the bottom helpers)
never imports the applications (the shapes world and its judge, nmm.eval, demo, sweep, bench,
inspect, cli), and inside the core every import points down the layer order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = ("the core does not import the apps", "the core's layers import downwards only")


def lint_imports(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    assert Path(exe).exists(), "lint-imports not found: install the dev extra (pip install -e '.[dev]')"
    return subprocess.run([exe, "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_import_contracts_are_kept():
    result = lint_imports(ROOT)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    for name in CONTRACTS:  # present and kept (a contract dropped from pyproject.toml fails here)
        assert f"{name} KEPT" in report, report


def test_function_level_imports_count(tmp_path):
    """What the contracts rely on: import-linter sees an import inside a function body, so a lazy
    import cannot carry a dependency past a contract."""
    package = tmp_path / "layered"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "high.py").write_text("")
    (package / "low.py").write_text(textwrap.dedent("""\
        def helper():
            from layered import high  # upwards, but only when called

            return high
    """))
    (tmp_path / ".importlinter").write_text(textwrap.dedent("""\
        [importlinter]
        root_package = layered

        [importlinter:contract:layers]
        name = high over low
        type = layers
        layers =
            layered.high
            layered.low
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = lint_imports(tmp_path, env)
    report = result.stdout + result.stderr
    assert result.returncode != 0 and "high over low BROKEN" in report, report
    assert "layered.low -> layered.high" in report, report

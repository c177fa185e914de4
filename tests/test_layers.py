"""The layering contract (pyproject.toml [tool.importlinter]), checked with import-linter's own command.

Stage packages never import each other; the CLI sits above everything and nothing imports it; the
shared pieces import no stage. The second test shows the contract does fail when a stage reaches into another.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's moeq, not the installed one
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          capture_output=True, text=True, cwd=root, env=env, timeout=120)


def test_the_layers_hold():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_a_stage_importing_another_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "moeq", tmp_path / "moeq", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    validate = tmp_path / "moeq" / "validate" / "stage.py"
    validate.write_text(validate.read_text().replace(
        "from moeq.validate.checks import validate_file\n",
        "from moeq.validate.checks import validate_file\nfrom moeq.quantize.stage import quantize_stage\n"))
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 broken" in proc.stdout
    assert "moeq.validate.stage -> moeq.quantize.stage" in proc.stdout

"""What moeq imports is what it declares: a package that only arrives through another one can vanish."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions

from packaging.requirements import Requirement

from conftest import REPO


def _imported_top_level_modules() -> dict[str, str]:
    """Top-level module -> the first moeq file that imports it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "moeq").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower().replace("_", "-") for r in project["dependencies"]}
    # The convert extra is imported only where a safetensors source is converted, and checked there first.
    optional = {Requirement(r).name.lower().replace("_", "-") for r in project["optional-dependencies"]["convert"]}
    distributions = packages_distributions()
    undeclared = []
    for module, where in _imported_top_level_modules().items():
        if module == "moeq" or module in sys.stdlib_module_names:
            continue
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & (declared | optional):
            undeclared.append(f"{module} ({where})")
    assert undeclared == [], "imported but not declared in pyproject.toml dependencies"

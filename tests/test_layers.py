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


def moeq_imports(root: Path) -> dict[str, set[str]]:
    """Each moeq module and the moeq modules it imports, at module level or inside a function."""
    import ast

    modules = {}
    for path in (root / "moeq").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {module_of(a.name) for a in node.names if a.name.startswith("moeq")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moeq") and not node.level:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else module_of(node.module)
                          for a in node.names}
        graph[name] = found - {name, None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: each group of modules that reach one another (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_counting_imports_inside_functions():
    graph = moeq_imports(REPO)
    assert "moeq.plan" in graph["moeq.build"] and "moeq.steps.wiring" in graph["moeq.plan"]
    assert cycles(graph) == []
    graph["moeq.cards.findings"].add("moeq.cards.lint")  # the check finds one where there is one
    assert ["moeq.cards.derived", "moeq.cards.findings", "moeq.cards.lint"] in cycles(graph)

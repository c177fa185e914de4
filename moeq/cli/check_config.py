"""`moeq check-config`: a pipeline file, and the repos and files it will produce."""

from __future__ import annotations

from rich.table import Table

from moeq.cli.options import ConfigOption, JsonOption
from moeq.cli.output import console, pipeline_from, show


def check_config(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Validate a pipeline file and show the repos and files it will produce."""
    pipeline = pipeline_from(config)
    from moeq.config import RECIPE_SEARCH

    rows = [{"quant": q.type, "file": q.file, "repo": pipeline.repo_id(q),
             "imatrix": str(q.imatrix) if q.imatrix else "none",
             "searched_file": q.searched_file if q.recipe == RECIPE_SEARCH else None} for q in pipeline.quants]
    show(as_json, {"pipeline": str(pipeline.path), "workspace": str(pipeline.workspace), "quants": rows},
         lambda: _print_config(pipeline, rows))


def _print_config(pipeline, rows: list[dict]) -> None:
    table = Table(title=f"{pipeline.path}: {pipeline.model.name}")
    for column in ("quant", "file", "repo", "imatrix"):
        table.add_column(column, overflow="fold")
    for row in rows:
        searched = f"\nor, when the search wins: {row['searched_file']}" if row["searched_file"] else ""
        table.add_row(row["quant"], row["file"] + searched, row["repo"], row["imatrix"])
    console.print(table)
    console.print(f"workspace: {pipeline.workspace}")

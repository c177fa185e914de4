"""What commands print and open: the console, stderr progress, the JSON result, the pipeline and its context."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console

from moeq.cli.app import state
from moeq.errors import ConfigError, InputError

DEFAULT_CONFIG = Path("pipeline.yaml")
console = Console()


def say(message: str) -> None:
    """Progress and warnings: stderr, so --json output stays clean."""
    sys.stderr.write(message + "\n")


def print_json(data: object) -> None:
    """The command's result on stdout (a command that printed it, then failed, prints no second document)."""
    state["printed_json"] = True
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def show(as_json: bool, data: object, render: Callable[[], None]) -> None:
    """A command's one result: a JSON document on stdout with --json, else `render()` for people."""
    if as_json:
        print_json(data)
    else:
        render()


class Results:
    """A command's results, one per quant or repo: each rendered for people as it comes (the others may take
    minutes), or all printed as one JSON list at the end with --json."""

    def __init__(self, as_json: bool):
        self.as_json, self.items = as_json, []

    def add(self, data: dict, render: Callable[[], None]) -> None:
        self.items.append(data)
        if not self.as_json:
            render()

    def done(self) -> None:
        if self.as_json:
            print_json(self.items)


def pipeline_from(config: Path | None):
    """The pipeline named by --config, else $MOEQ_CONFIG, else ./pipeline.yaml.

    Once it loads, the first line of output (on stderr, so --json stays clean) says which file that was;
    a file that does not load is named by its error.
    """
    from moeq.config import load_pipeline

    if config is not None:
        path, why = config, "--config"
    elif os.environ.get("MOEQ_CONFIG"):
        path, why = Path(os.environ["MOEQ_CONFIG"]), "MOEQ_CONFIG"
    else:
        path, why = DEFAULT_CONFIG, "default"
        if not path.is_file():
            raise ConfigError(path.resolve(), "no pipeline file here",
                              "pass --config PATH, set MOEQ_CONFIG, or run moeq in the folder that holds pipeline.yaml")
    pipeline = load_pipeline(path)
    sys.stderr.write(f"pipeline: {path} ({why})\n")
    return pipeline


def open_context(config: Path | None):
    """The one context of a command: the pipeline (--config, $MOEQ_CONFIG, ./pipeline.yaml), its workspace,
    records, tools and Hub client, with progress going to stderr."""
    from moeq.steps.context import Context

    return Context.of(pipeline_from(config), say=say)


def selected_quants(pipeline, names: list[str] | None) -> list:
    """The quants named on the command line, or the whole ladder."""
    return [pipeline.quant(q) for q in names] if names else list(pipeline.quants)


def quiet_progress_off_terminal() -> None:
    """huggingface_hub's progress bars on a terminal; in logs (CI) they would be noise."""
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def require_gguf_file(file: Path) -> None:
    """FILE must be a file: a folder or a missing path is one error that says so."""
    if file.is_dir():
        raise InputError(file, "a folder", "pass the path of a GGUF model")
    if not file.is_file():
        raise InputError(file, "no such file", "pass the path of a GGUF model")


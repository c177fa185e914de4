"""The README against the code: its command table lists every command and option `moeq` has, and its
pipeline.yaml reference every key the pipeline file takes, and nothing either does not have."""

from __future__ import annotations

import re
import typing

import typer.main

from moeq.cli import app
from moeq.config import TOP_LEVEL, Pipeline, keys_of

from conftest import REPO

README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """A section of the README up to its first subsection."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n#", start + 1)
    return README[start:end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
    """Each row of the Markdown tables in `text`, as cells ("\\|" inside a cell is a literal bar)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def code_commands() -> dict[str, set[str]]:
    """Every command `moeq` runs ("card", "card lint", ...) -> its long options."""
    commands = {}

    def walk(command, path: str) -> None:
        subcommands = getattr(command, "commands", None)
        if path and (not subcommands or getattr(command, "invoke_without_command", False)):
            commands[path] = {opt for p in command.params for opt in p.opts if opt.startswith("--")} - {"--help"}
        for name, sub in (subcommands or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return commands


def readme_commands() -> dict[str, str]:
    """Each command the Commands table documents -> the text of its rows."""
    documented: dict[str, str] = {}
    for cells in table_rows(section("Commands")):
        usage = re.match(r"`moeq ((?:[a-z][a-z0-9-]*(?: |`))+)", cells[0])
        if usage:
            name = usage.group(1).strip(" `")
            documented[name] = documented.get(name, "") + " ".join(cells)
    return documented


def test_the_command_table_lists_every_command_and_nothing_else():
    assert sorted(readme_commands()) == sorted(code_commands())


def test_each_commands_row_names_every_option_it_takes():
    documented = readme_commands()
    missing = {name: sorted(opt for opt in options if not re.search(re.escape(opt) + r"(?![\w-])", documented[name]))
               for name, options in code_commands().items()}
    assert {name: opts for name, opts in missing.items() if opts} == {}


def code_keys() -> set[str]:
    """Every key pipeline.yaml takes, from the dataclasses the file is read into (what load.py allows)."""
    hints = typing.get_type_hints(Pipeline)
    keys = set()
    for name in TOP_LEVEL:
        spec = hints[name]
        if typing.get_origin(spec) is tuple:  # quants: a list of QuantSpec
            keys |= {f"{name}[]"} | {f"{name}[].{key}" for key in keys_of(typing.get_args(spec)[0])}
        elif hasattr(spec, "__dataclass_fields__"):
            keys |= {f"{name}.{key}" for key in keys_of(spec)}
        else:
            keys.add(name)
    return keys


def test_the_pipeline_reference_lists_every_key_and_nothing_else():
    documented = {key for cells in table_rows(section("pipeline.yaml reference"))
                  for key in re.findall(r"`([a-z_\[\].]+)`", cells[0])}
    assert documented - {"key"} == code_keys()

"""`moeq validate`: the checks of a GGUF file, or the validate stage of a quant of the ladder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeq.cli.options import JsonOption
from moeq.cli.output import console, open_context, print_json, require_gguf_file
from moeq.errors import InputError
from moeq.records import record_json


def validate(
    file: Annotated[Optional[Path], typer.Argument(help="The GGUF file to check (or use --config/--quant).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Validate the ladder's file for "
                                                   "--quant against the workspace's source (the pipeline: "
                                                   "--config, $MOEQ_CONFIG, else ./pipeline.yaml).")] = None,
    against: Annotated[Optional[Path], typer.Option(help="The F16 source it was made from.")] = None,
    numerics: Annotated[str, typer.Option(help="sample, full or off.")] = "sample",
    arch: Annotated[Optional[str], typer.Option(help="Expected architecture (default: the source's; without "
                                                "one, any mixture of experts llama.cpp runs).")] = None,
    quant: Annotated[Optional[str], typer.Option(help="Quant type FILE should be (checks the type mix).")] = None,
    force: Annotated[bool, typer.Option("--force", help="With the pipeline: check again even when the record "
                                        "is current.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Check FILE: container, model, tensors, type mix, metadata and numerics against its source."""
    from moeq.validate.checks import validate_file

    if numerics not in ("sample", "full", "off"):
        raise InputError(f"--numerics {numerics!r}", "not a numerics setting", "use sample, full or off")
    if file is None and quant is not None:  # a quant of the ladder: the pipeline's file and source
        from moeq.plan import Options, run_to

        ctx = open_context(config)
        options = Options(force=frozenset({"validate"} if force else ()), download=False, numerics=numerics)
        done = run_to(ctx, "validate", [ctx.pipeline.quant(quant)], options)[("validate", quant)]
        record = done.record
        if done.up_to_date and not as_json:
            console.print(f"{record.quant}: up to date (the record checked this file; --force to check again)",
                          soft_wrap=True)
        _report_checks(record.file.path, record.checks, record_json(record) if as_json else None)
        return
    if config is not None:
        raise InputError("--config", "needs --quant TYPE", "say which quant of the ladder to validate")
    if file is None:
        raise InputError("moeq validate", "nothing to validate", 
                         "give a GGUF file, or --quant TYPE for a quant of the pipeline's ladder")
    require_gguf_file(file)
    report = validate_file(file, against, numerics, arch, quant)
    _report_checks(str(file), report.checks, report.as_dict() if as_json else None)


def _report_checks(file: str, checks: list[dict], as_json: dict | None) -> None:
    """Print the checks (a table, or `as_json` when given) and fail when any check failed."""
    if as_json is not None:
        print_json(as_json)
    else:
        table = Table(title=f"validate {file}")
        for column in ("check", "result", "detail"):
            table.add_column(column, overflow="fold")
        for check in checks:
            table.add_row(check.name, "[green]pass[/]" if check.ok else "[red]FAIL[/]", check.detail)
        console.print(table)
    from moeq.steps.policy import require_passed

    require_passed(file, checks, "the table above says why")

"""`moeq doctor`: the llama.cpp tools, Python packages, Hub login and disk space."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeq.cli.options import JsonOption
from moeq.cli.output import console, pipeline_from, print_json
from moeq.errors import CheckFailed
from moeq.toolchain import Toolchain
from moeq.units import binary_size, decimal_size


def doctor(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Also validate this pipeline file "
                                                   "and check disk space for it (default: $MOEQ_CONFIG; without "
                                                   "either, only the machine is checked).")] = None,
    job: Annotated[Optional[list[str]], typer.Option("--job", help="Check the disk for one job of a release across "
                                                     "machines: a quant type (repeatable), or 'imatrix' (the F16 and "
                                                     "the importance matrix). Default: the whole ladder here.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Check the llama.cpp tools, Python packages, Hub login and (with --config) disk space."""
    from moeq.doctor import IMATRIX_JOB, run_doctor
    from moeq.errors import InputError

    # Not ./pipeline.yaml by default: in a checkout that is the full release, and doctor checks the machine.
    pipeline = pipeline_from(config) if config is not None or os.environ.get("MOEQ_CONFIG") else None
    if job and pipeline is None:
        raise InputError("--job", "needs a pipeline", "give --config (the pipeline whose job it is)")
    jobs = [j if j == IMATRIX_JOB else pipeline.quant(j).type for j in job] if job else None
    chain = pipeline.toolchain.chain(fresh=True) if pipeline else Toolchain(fresh=True)
    report = run_doctor(chain, pipeline, jobs)
    if as_json:
        print_json(report.as_dict())
    else:
        table = Table(title="llama.cpp tools")
        for column in ("tool", "status", "commit", "backend", "path"):
            table.add_column(column, overflow="fold")
        for check in report.tools:
            status = f"[green]{check.detail}[/]" if check.ok else "[red]problem (below)[/]"
            table.add_row(check.name, status, check.commit, check.backend, check.path)
        console.print(table)
        for check in report.tools:
            if not check.ok:
                sys.stdout.write(f"problem: {check.detail}\n")
        gpus = ", ".join(f"{g['name']}" + (f" ({binary_size(g['memory_bytes'])})" if g["memory_bytes"] else "")
                         for g in report.gpus)
        console.print(f"NVIDIA GPUs: {gpus or 'none (nvidia-smi lists none)'}")
        for warning in report.warnings:
            sys.stdout.write(f"warning: {warning}\n")
        packages = Table(title="Python packages")
        packages.add_column("package")
        packages.add_column("version")
        for name, version in report.packages.items():
            packages.add_row(name, version)
        console.print(packages)
        console.print(f"Hub endpoint: {report.hub_endpoint}", highlight=False)
        console.print(f"Hub token present: {'yes' if report.hub_token_present else 'no'}")
        for access in report.hub_access:
            mark = "may write" if access.ok else "may NOT write"
            need = "" if access.ok or report.hub_required else " (needed only to push: the pipeline does not push here)"
            console.print(f"Hub namespace {access.namespace}: the token {mark} there: {access.detail}{need}",
                          soft_wrap=True, markup=False, highlight=False)
        if report.disk:
            disk = report.disk
            if disk.needed_bytes is None:
                console.print(f"Disk: {decimal_size(disk.free_bytes)} free in {disk.workspace}; need unknown "
                              "(set model.parameters in the pipeline file)")
            else:
                verdict = "[green]OK[/]" if disk.ok else "[red]NOT ENOUGH[/]"
                console.print(f"Disk: {decimal_size(disk.free_bytes)} free in {disk.workspace}, "
                              f"pipeline needs {decimal_size(disk.needed_bytes)} (its peak, about "
                              f"{decimal_size(disk.peak_bytes)}, with 10% and 64 MiB of room): {verdict}")
                if disk.refetch_bytes:
                    console.print(f"  a later moeq fetch --force downloads beside it all: about "
                                  f"{decimal_size(disk.refetch_bytes)}")
    if not report.ok:
        raise CheckFailed("moeq doctor", f"found problems with: {', '.join(report.problems())}",
                          "fix what the lines above name")
    if not as_json:
        console.print("verdict: ready" + (" (tools, disk and the Hub)" if report.hub_required else
                                          " (tools and disk)" if report.disk else " (tools)"), highlight=False)

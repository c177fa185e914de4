"""`moeq imatrix`: the imatrix stage, and each expert's coverage."""

from __future__ import annotations

from typing import Annotated

import typer

from moeq.cli.options import ConfigOption, JsonOption
from moeq.cli.output import console, open_context, show
from moeq.records import record_json


def imatrix(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="Run even when the record says it is up to date.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Compute the importance matrix of the F16 source with the calibration text, and each expert's coverage.

    Quants with `imatrix: auto` are made with it (moeq build and moeq quantize run this first for them).
    """
    from moeq.plan import IMATRIX, Options, run_to

    ctx = open_context(config)
    done = run_to(ctx, "imatrix", list(ctx.pipeline.quants),
                  Options(force=frozenset({"imatrix"} if force else ()), download=False))[IMATRIX]
    show(as_json, {"skipped": done.up_to_date, "record": record_json(done.record)}, lambda: _print_imatrix(done))


def _print_imatrix(done) -> None:
    record = done.record
    state = "up to date" if done.up_to_date else f"done in {done.seconds:.1f} s"
    coverage = record.coverage
    console.print(f"imatrix: {state}: {record.output.path} ({record.chunks} chunks of {record.ctx} tokens of "
                  f"{record.calibration.name})", soft_wrap=True)
    console.print(f"expert coverage: {coverage.experts} experts, tokens per expert min {coverage.min:,}, median "
                  f"{coverage.median:,.0f}, max {coverage.max:,}; {len(coverage.under)} under "
                  f"{coverage.min_expert_tokens}", soft_wrap=True)
    for warning in record.warnings if done.up_to_date else []:  # a run said them as it went
        console.print(f"[yellow]warning[/]: {warning}", soft_wrap=True)

"""`moeq compare`: the files the pipeline's compare: lists, fetched and measured beside the ladder."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from moeq.cli.options import ConfigOption, JsonOption
from moeq.cli.output import Results, console, open_context, quiet_progress_off_terminal
from moeq.records import record_json


def compare(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="Fetch and measure again even when the record is current.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Fetch each GGUF that compare: lists (another publisher's file of the same model), check from its header that
    it is a quantization of the F16 source, and measure it as the bench measures the ladder: KL divergence against
    the same F16 logits on the same text, and tokens/s on this machine. The card shows them beside the ladder's rung
    of the nearest size. A file of another model is refused, naming its first difference (exit 3)."""
    from moeq.errors import ConfigError
    from moeq.plan import Options, run_to
    from moeq.steps.policy import require_same_model

    ctx = open_context(config)
    if not ctx.pipeline.compare:
        raise ConfigError(ctx.pipeline.path, "compare: lists no files",
                          "add compare: [{repo: OWNER/NAME, file: FILE.gguf}] to the pipeline file")
    quiet_progress_off_terminal()
    results = run_to(ctx, "compare", [], Options(force=frozenset({"compare"} if force else ()), download=False))
    shown = Results(as_json)
    records = [results[("compare", peer.id)] for peer in ctx.pipeline.compare]
    for done in records:
        shown.add({"skipped": done.up_to_date, "record": record_json(done.record)},
                  lambda done=done: _print(done.record, done.up_to_date))
    shown.done()
    for done in records:
        require_same_model(done.record)


def _print(record, up_to_date: bool) -> None:
    where = f"{record.repo}/{record.repo_file}@{record.commit[:12]}"
    if record.refused is not None:
        console.print(f"{escape(where)}: refused: {escape(record.refused)}", soft_wrap=True, highlight=False)
        return
    table = Table(title=f"{where}: {'up to date' if up_to_date else 'measured'}")
    for column in ("figure", "value"):
        table.add_column(column)
    figures = record.quality.quant
    table.add_row("size", f"{record.size:,} bytes")
    table.add_row("bits per weight", f"{record.bpw:.2f}")
    table.add_row("tensor types", ", ".join(f"{t.type} x{t.tensors}" for t in record.types))
    for name, value, digits in (("mean KLD", figures.kld_mean, 6), ("99% KLD", figures.kld_p99, 6),
                                ("max KLD", figures.kld_max, 6), ("same top token %", figures.same_top_p, 2),
                                ("PPL", figures.ppl_q, 4)):
        table.add_row(name, "not printed" if value is None else f"{value:.{digits}f}")
    for run in record.speed:
        for test in run.tests:
            table.add_row(f"{run.mode} {test.test} tokens/s", f"{test.avg_ts:.1f} ± {test.stddev_ts:.1f}")
    console.print(table)
    for error in record.errors:
        console.print(f"{escape(where)} mode {error.mode} failed: {escape(error.error)}", soft_wrap=True)

"""`moeq quantize`: the quantize stage, with a progress bar per tensor."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from moeq.cli.options import ConfigOption, JsonOption, QuantsOption
from moeq.cli.output import Results, console, open_context, selected_quants
from moeq.records import ChoiceRecord, record_json
from moeq.units import decimal_size


def quantize(
    config: ConfigOption = None,
    quant: QuantsOption = None,
    force: Annotated[bool, typer.Option(help="Run even when the record says it is up to date.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="Threads for llama-quantize.")] = None,
    allow_requantize: Annotated[bool, typer.Option(help="Accept an already-quantized source "
                                                   "(loses quality).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Quantize the configured F16 source into each requested quant of the ladder.

    A quant with an importance matrix is first made with and without it, both measured against F16 on the
    evaluation text (the choice stage); the file made is the one published: with `imatrix: auto`, the one with the
    lower mean KL divergence beyond twice the combined uncertainty, else the stock choice (with it).
    """
    from moeq.plan import Options, run_to
    from moeq.quantize.stage import log_path

    ctx = open_context(config)
    results = Results(as_json)
    for spec in selected_quants(ctx.pipeline, quant):
        with _quantize_progress(spec.type, plain=as_json or not console.is_terminal) as on_tensor:
            options = Options(force=frozenset({"quantize"} if force else ()), download=False, threads=threads,
                              allow_requantize=allow_requantize, on_tensor=on_tensor)
            done = run_to(ctx, "quantize", [spec], options)[("quantize", spec.type)]
        record = done.record
        chosen = ctx.records.get(ChoiceRecord, spec.type) if spec.imatrix is not None else None
        if chosen is not None and chosen.published.file.sha256 != record.output.sha256:
            chosen = None  # another file than the one made now (--allow-requantize)
        results.add({"skipped": done.up_to_date, "log": str(log_path(ctx.ws.quant_path(spec.file))),
                     "record": record_json(record), "choice": record_json(chosen) if chosen else None},
                    lambda: _print_quantized(done, chosen))
    results.done()


def _print_quantized(done, chosen) -> None:
    record = done.record
    state = "up to date" if done.up_to_date else f"done in {done.seconds:.1f} s"
    console.print(f"{record.quant}: {state}: {record.output.path} "
                  f"({decimal_size(record.output.size)}, {record.quant_bpw:.2f} BPW)", soft_wrap=True)
    if chosen is not None:
        console.print(f"{record.quant}: made {chosen.published.name}: {chosen.why}", soft_wrap=True)


class _quantize_progress:
    """A rich progress bar on a terminal; plain log lines (stderr) otherwise."""

    def __init__(self, label: str, plain: bool):
        self.label, self.plain = label, plain
        self.progress = None
        self.task = None
        self.mib_in = self.mib_out = 0.0

    def __enter__(self):
        if not self.plain:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[mib]}"), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=console, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task(self.label, total=None, mib="")
        return self.on_tensor

    def on_tensor(self, t) -> None:
        self.mib_in += t.mib_in
        self.mib_out += t.mib_out
        if self.plain:
            sys.stderr.write(f"{self.label}: [{t.index}/{t.total}] {t.name} {t.type_before} -> {t.type_after} "
                             f"({self.mib_in:.1f} -> {self.mib_out:.1f} MiB)\n")
        else:
            self.progress.update(self.task, total=t.total, completed=t.index,
                                 mib=f"{self.mib_in:.1f} -> {self.mib_out:.1f} MiB")

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

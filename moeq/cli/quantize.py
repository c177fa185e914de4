"""`moeq quantize`: the quantize stage (llama-quantize's tensors shown as they are done: moeq/progress.py)."""

from __future__ import annotations

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
        options = Options(force=frozenset({"quantize"} if force else ()), download=False, threads=threads,
                          allow_requantize=allow_requantize)
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


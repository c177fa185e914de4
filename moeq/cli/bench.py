"""`moeq bench`: the bench stage: speed, memory per device and quality against F16."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from moeq.cli.options import ConfigOption, JsonOption, QuantsOption
from moeq.cli.output import Results, console, open_context, selected_quants
from moeq.records import record_json


def bench(
    config: ConfigOption = None,
    quant: QuantsOption = None,
    modes: Annotated[Optional[list[str]], typer.Option("--mode", "--modes", help="cpu, gpu, cpu-moe or N (-ncmoe N), repeatable; "
                                                       "default: bench.modes.")] = None,
    rpc: Annotated[Optional[str], typer.Option(help="HOST:PORT of a ggml-rpc-server to use as the offload "
                                               "device (for machines without a GPU), or local to start one; "
                                               "default: bench.rpc.")] = None,
    force: Annotated[bool, typer.Option(help="Measure again even when the record is current.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Measure speed (llama-bench), buffers per device (llama-completion) and quality against F16 (llama-perplexity)."""
    from moeq.plan import Options, run_to
    from moeq.steps.policy import require_measured

    ctx = open_context(config)
    results, benched = Results(as_json), []
    options = Options(force=frozenset({"bench"} if force else ()), download=False,
                      modes=tuple(modes) if modes else None, rpc=rpc)
    for spec in selected_quants(ctx.pipeline, quant):
        done = run_to(ctx, "bench", [spec], options)[("bench", spec.type)]
        benched.append(done.record)
        results.add({"skipped": done.up_to_date, "record": record_json(done.record)},
                    lambda: _print_bench(done.record, done.up_to_date))
    results.done()
    require_measured(benched, ctx.ws.records_dir)


def _print_bench(record, skipped: bool) -> None:
    machine = record.machine
    table = Table(title=f"{record.quant}: {'up to date' if skipped else 'measured'} on {machine.cpu}"
                        f"{', ' + machine.gpus[0].name if machine.gpus else ''}")
    for column in ("mode", "test", "tokens/s", "device model MiB (plan)", "device KV MiB (plan)"):
        table.add_column(column)
    memory = {m.mode: m for m in record.memory}
    for run in record.speed:
        mem = memory.get(run.mode)
        for test in run.tests:
            table.add_row(run.mode, test.test, f"{test.avg_ts:.1f} ± {test.stddev_ts:.1f}",
                          f"{mem.device_mib['model']} ({mem.planned_mib['model']})" if mem else "",
                          f"{mem.device_mib['KV']} ({mem.planned_mib['KV']})" if mem else "")
    console.print(table)
    if record.quality:
        q = record.quality.quant

        def fig(key: str, digits: int) -> str:
            value = getattr(q, key)
            return "unknown" if value is None else f"{value:.{digits}f}"

        console.print(f"quality: PPL {fig('ppl_q', 4)} vs F16 {fig('ppl_base', 4)}, mean KLD {fig('kld_mean', 6)}, "
                      f"same top token {fig('same_top_p', 2)} %")
    if record.not_measured:
        modes = ", ".join(m.mode for m in record.not_measured)
        console.print(f"{record.quant}: not measured: {modes} ({record.not_measured[0].reason}); to measure "
                      "them, run on a machine with an NVIDIA GPU and the CUDA build (scripts/setup --backend cuda) "
                      "or pass --rpc HOST:PORT (bench.rpc)", soft_wrap=True)
    for error in record.errors:  # the command's one error line (stderr) sums them up
        console.print(f"{record.quant} mode {error.mode} failed: {error.error}", soft_wrap=True)

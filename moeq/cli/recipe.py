"""`moeq recipe`: the recipe search alone, or its plan."""

from __future__ import annotations

from typing import Annotated

import typer

from moeq.cli.options import ConfigOption, JsonOption, QuantsOption
from moeq.cli.output import Results, console, open_context, selected_quants
from moeq.records import record_json


def recipe(
    config: ConfigOption = None,
    quant: QuantsOption = None,
    plan: Annotated[bool, typer.Option("--plan", help="Say what the search would cost, and run nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Run even when the record says it is up to date.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Search the per-tensor types of each rung with `recipe: search`, on measured KL divergence under its budget.

    Every recipe measured is kept in records/recipe-TYPE.json; the chosen one is written as a llama-quantize
    --tensor-type-file beside the file it makes. Without --quant, every rung that asks for a search.
    """
    from moeq.config import RECIPE_SEARCH
    from moeq.plan import FETCH, Options, run_to
    from moeq.steps.wiring import recipe_current, recipe_plan

    ctx = open_context(config)
    quants = selected_quants(ctx.pipeline, quant) if quant else [q for q in ctx.pipeline.quants
                                                                  if q.recipe == RECIPE_SEARCH]
    if not quants:
        from moeq.errors import ConfigError

        raise ConfigError(ctx.pipeline.path, "quants: no rung has recipe: search",
                          "add it to one, e.g. - {type: Q2_K, imatrix: auto, recipe: search, budget: stock}")
    results = Results(as_json)
    for spec in quants:
        if plan:
            source = run_to(ctx, "fetch", [spec], Options(download=False))[FETCH].record
            planned, done = recipe_plan(ctx, spec, source), recipe_current(ctx, spec, source)
            results.add({"quant": spec.type, "plan": planned.as_dict(), "up_to_date": done is not None,
                         "chosen": _chosen(done) if done else None},
                        lambda: console.print(f"{spec.type}: " + (f"up to date: {_chosen_line(done)}" if done else
                                                                  planned.describe()), soft_wrap=True))
            continue
        options = Options(force=frozenset({"recipe"} if force else ()), download=False)
        done = run_to(ctx, "recipe", [spec], options)[("recipe", spec.type)]
        results.add({"skipped": done.up_to_date, "record": record_json(done.record)}, lambda: _print_recipe(done))
    results.done()


def _print_recipe(done) -> None:
    state = "up to date" if done.up_to_date else f"done in {done.seconds:.1f} s"
    console.print(f"{done.record.quant}: {state}: {_chosen_line(done.record)}", soft_wrap=True)


def _chosen(record) -> dict:
    chosen = record.evals[record.chosen]
    return {"label": chosen.label, "kld_mean": chosen.quality.kld_mean,
            "stock_kld_mean": record.evals[0].quality.kld_mean, "tensor_bytes": chosen.tensor_bytes,
            "budget_bytes": record.budget_bytes, "recipe": record.recipe_file.path}


def _chosen_line(record) -> str:
    chosen, stock = record.evals[record.chosen], record.evals[0]
    return (f"{len(record.evals)} recipes measured on {record.selection.text}; chosen: {chosen.label}, mean KLD "
            f"{chosen.quality.kld_mean:.6f} against the stock {stock.quality.kld_mean:.6f}, {chosen.tensor_bytes:,} "
            f"bytes of {record.budget_bytes:,}; recipe {record.recipe_file.path}")

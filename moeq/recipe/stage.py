"""The recipe stage: a rung's per-tensor types, searched on measured KL divergence under a budget.

For a rung with `recipe: search` it quantizes the F16 once per type it may use, only the tensors that may take
that type (recipe/pure.py: `--pure`, with the importance matrix where the rung has one; WORKSPACE/recipe/pure/),
then measures recipes assembled from those files tensor by tensor (recipe/assemble.py, byte for byte what
llama-quantize would make) against the F16 logits on the selection text: the stock recipe (the rung's own
llama.cpp mixture), the stock recipe with each group one type higher and one lower, and the recipe those figures predict is best
under the budget (recipe/search.py). Of every recipe measured that fits the budget, the lowest mean KL
divergence is chosen. Each measurement is saved as it is made (WORKSPACE/recipe/TYPE/evals/, by the recipe,
the options and what the per-type files are made from), so an interrupted search continues where it stopped
and a finished one costs nothing.

It writes the chosen recipe as a `--tensor-type-file` (WORKSPACE/recipe/TYPE/<stem>-TYPE_MOEQ.recipe), the
assembled file beside it (the choice stage has llama-quantize make it again from the recipe file, checks that
the two are the same bytes, and deletes this one), and a RecipeRecord with every measurement and the one
llama-quantize command that rebuilds the file. Its key is the source, the importance matrix, the stock file,
the selection options, the budget and the search settings.

    result = run_stage(recipe_stage(pipeline, quant, ws, chain, fetched, stock, on_message=print), records)
    result.record.evals[result.record.chosen].quality.kld_mean
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from moeq import texts
from moeq.config import Pipeline, QuantSpec
from moeq.errors import InputError
from moeq.kld import base_logits
from moeq.quant_types import lookup
from moeq.records import (FileRef, PerplexityOptions, QuantizeRecord, FetchRecord, RecipeGroup, RecipeRecord,
                          ToolBuildRef)
from moeq.recipe.budget import GpuCount, budget_bytes, gpu_room, require_gpu_reachable, require_reachable
from moeq.recipe.cost import Plan, base_type, layers_per_group, planned_runs
from moeq.recipe.measure import Measurements, Setup
from moeq.recipe.pure import needed_tensors, type_files
from moeq.recipe.search import TYPE_LADDER, Group, Ladder, Option, groups_of, predicted, recipe_lines, solve, stepped
from moeq.stage_runner import Stage
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace, write_text_atomic

UNQUANTIZED = {"F32", "F16", "BF16"}


def selection_options(pipeline: Pipeline, ws: Workspace) -> tuple[Path, PerplexityOptions]:
    text = texts.selection(pipeline)
    cfg = pipeline.recipe
    return text, PerplexityOptions(text=text.name, text_sha256=ws.hashes.sha256(text), ctx=cfg.ctx, chunks=cfg.chunks)


def recipe_stage(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, chain: Toolchain, source: FetchRecord,
                 stock: QuantizeRecord, *, on_message: Callable[[str], None] = lambda _msg: None
                 ) -> Stage[RecipeRecord]:
    """Search `quant`'s recipe; `stock` is the rung's stock file, made with the importance matrix the search uses."""
    base = base_type(quant.type)
    file_type = lookup(quant.type).file_type
    tool = chain.tool("llama-quantize")
    text, options = selection_options(pipeline, ws)
    settings = pipeline.recipe
    limit = budget_bytes(quant, stock)
    room, n_cpu_moe = gpu_room(quant, Path(source.output.path))
    stock_types = {row.name: row.type_after for row in stock.tensors if row.type_after not in UNQUANTIZED}
    ladder = Ladder.of(stock.options.imatrix is not None, {row.name: row.shape for row in stock.tensors})
    off_ladder = sorted({t for t in stock_types.values() if t not in TYPE_LADDER})
    if off_ladder:
        raise InputError(stock.output.path, f"the stock {quant.type} has tensors of type {', '.join(off_ladder)}, "
                         f"which a searched recipe does not use ({', '.join(TYPE_LADDER)})",
                         f"publish the stock {quant.type} (remove recipe: search from quants[{quant.type}])")
    n_layer = stock.model.block_count or 1
    per_group = layers_per_group(pipeline, n_layer)
    groups = groups_of(stock_types, n_layer, per_group)
    folder = ws.root / "recipe" / quant.type

    def key() -> dict:
        return {"source_sha256": source.output.sha256, "stock_sha256": stock.output.sha256,
                "imatrix": stock.options.imatrix.sha256 if stock.options.imatrix else None,
                "selection": options.model_dump(mode="json"), "budget_bytes": limit, "gpu_room": room,
                "n_cpu_moe": n_cpu_moe,
                "layers_per_group": per_group, "max_evals": settings.max_evals, "types": list(TYPE_LADDER)}

    def run() -> RecipeRecord:
        started = time.monotonic()
        texts.require_selection(pipeline, options.ctx)
        files = type_files(ws, tool, source.output, stock.options.imatrix, needed_tensors(stock_types, base, ladder),
                           on_message)
        sizes = files.sizes()
        fixed = sum(row.bytes_after for row in stock.tensors if row.name not in stock_types)
        require_reachable(quant, limit, fixed, sizes, stock_types, ladder)
        gpu = GpuCount(stock, stock_types, sizes, n_cpu_moe) if room is not None else None
        if gpu is not None:
            require_gpu_reachable(quant, room, gpu, stock_types, ladder)
        base_kld, _base = base_logits(ws, chain, source.output, options, text, tool.build.commit, purpose="selection",
                                      threads=pipeline.bench.threads, timeout_s=pipeline.bench.timeout_s,
                                      on_message=on_message)
        plan = Plan(len(groups), planned_runs(pipeline, groups, stock_types, ladder), options.ctx * options.chunks,
                    tuple(files.types), files.disk_bytes(), limit)
        search = Measurements(Setup(ws, chain, pipeline, folder, files, [row.name for row in stock.tensors], sizes,
                                    base, file_type, stock_types, fixed, text, options, base_kld, gpu), plan.runs,
                              on_message)
        on_message(f"{quant.type}: recipe search, {plan.describe()}; budget {limit:,} bytes"
                   + (f", {room:,} bytes of weights on the GPU" if room is not None else ""))
        best, predicted_kld = _search(quant, groups, search, limit, room, ladder)
        tensor_types = {**stock_types, **search.evals[best].changes}
        return _record(quant, search, source, stock, tool, limit, room, groups, best, predicted_kld, tensor_types,
                       round(time.monotonic() - started, 1))

    return Stage("recipe", quant.type, key=key, run=run, tool=lambda: tool, intact=lambda r: _intact(ws, r))


def _search(quant: QuantSpec, groups: list[Group], search: Measurements, limit: int,
            room: int | None, ladder: Ladder) -> tuple[int, float | None]:
    """Measure the stock recipe, each group one type up and down, and the recipe those figures predict is best
    under the budget; return the measured recipe that fits with the lowest mean KL divergence, and the figure
    predicted for it when it is the solution."""
    setup = search.setup
    stock_eval = search.evaluate("stock", {})
    options_by_group: dict[str, list[Option]] = {}
    # the largest groups first; under a GPU budget the groups on the GPU before them: they must fit it
    order = sorted(groups, key=lambda g: (setup.gpu is not None and not set(g.tensors) & set(setup.gpu.names),
                                          -sum(setup.sizes[setup.base].get(n, 0) for n in g.tensors)))
    for group in order:
        opts = [Option(group.name, 0, (), 0, stock_eval.quality.kld_mean, stock_eval.quality.kld_mean_err)]
        for step, word in ((1, "up"), (-1, "down")):
            types = stepped(setup.stock_types, group, step, ladder)
            if types is None or search.runs_left() <= 1:
                continue
            measured = search.evaluate(f"{group.name} {word}", types)
            opts.append(Option(group.name, step, tuple(sorted(types.items())),
                               measured.tensor_bytes - stock_eval.tensor_bytes, measured.quality.kld_mean,
                               measured.quality.kld_mean_err,
                               (measured.gpu_bytes or 0) - (stock_eval.gpu_bytes or 0)))
        options_by_group[group.name] = opts
    chosen = solve(options_by_group, limit - stock_eval.tensor_bytes, stock_eval.quality.kld_mean,
                   None if room is None else room - stock_eval.gpu_bytes)
    predicted_kld = None
    if chosen and any(o.step for o in chosen.values()) and search.runs_left() > 0:
        predicted_kld = predicted(chosen, stock_eval.quality.kld_mean)
        search.evaluate("solution", {name: t for o in chosen.values() for name, t in o.types})
    fits = [i for i, e in enumerate(search.evals) if e.tensor_bytes <= limit and (room is None or e.gpu_bytes <= room)]
    if not fits:
        max_evals = setup.pipeline.recipe.max_evals
        raise InputError(f"quants[{quant.type}].budget",
                         f"{limit:,} bytes" + (f" ({room:,} on the GPU)" if room is not None else "")
                         + ", and no measured recipe fits it (the search moves each group one type from the stock file)",
                         "raise the budget"
                         + (f", or recipe.max_evals ({max_evals} runs did not measure every group)"
                            if any(len(o) == 1 for o in options_by_group.values()) else ""))
    # the solution wins a tie: it is the same recipe as a single-group one when only that group changed
    best = min(fits, key=lambda i: (search.evals[i].quality.kld_mean, search.evals[i].label != "solution"))
    return best, predicted_kld if search.evals[best].label == "solution" else None


def _intact(ws: Workspace, record: RecipeRecord) -> bool:
    """The recipe file is as the record says (the assembled file is deleted once llama-quantize made it again)."""
    ref = record.recipe_file
    return Path(ref.path).is_file() and ws.hashes.sha256(Path(ref.path)) == ref.sha256


def _record(quant: QuantSpec, search: Measurements, source: FetchRecord, stock: QuantizeRecord, tool, limit: int,
            room: int | None, groups: list[Group], best: int, predicted_kld: float | None,
            tensor_types: dict[str, str], seconds: float) -> RecipeRecord:
    """The chosen recipe written as a --tensor-type-file, its file assembled beside it, and the record of both."""
    setup = search.setup
    base = setup.base
    embd = tensor_types.get("token_embd.weight", base)
    output = tensor_types.get("output.weight", embd)
    recipe_path = setup.folder / f"{Path(quant.searched_file).stem}.recipe"
    lines = recipe_lines(tensor_types, base)
    write_text_atomic(recipe_path, "".join(f"{pattern}={ggml_type}\n" for pattern, ggml_type in lines))
    out = setup.folder / quant.searched_file
    setup.files.assemble(setup.order, base, tensor_types, out, setup.file_type)
    imatrix = stock.options.imatrix
    command = ["llama-quantize", "--pure", *(["--imatrix", Path(imatrix.path).name] if imatrix else []),
               "--tensor-type-file", recipe_path.name, "--token-embedding-type", embd.lower(),
               "--output-tensor-type", output.lower(), Path(source.output.path).name, quant.searched_file, quant.type]
    return RecipeRecord(
        quant=quant.type, base_type=base, budget=quant.budget.describe() if quant.budget else "stock",
        budget_bytes=limit, gpu_budget_bytes=room, source=source.output, imatrix=imatrix, selection=setup.options,
        tool=ToolBuildRef(**tool.build.as_dict()), types=setup.files.types,
        groups=[RecipeGroup(name=g.name, tensors=list(g.tensors)) for g in groups], stock_types=setup.stock_types,
        evals=search.evals, chosen=best, predicted_kld=predicted_kld, tensor_types=tensor_types,
        token_embedding_type=embd, output_tensor_type=output,
        recipe_file=FileRef(path=str(recipe_path), size=recipe_path.stat().st_size,
                            sha256=setup.ws.hashes.sha256(recipe_path)),
        output=FileRef(path=str(out), size=out.stat().st_size, sha256=setup.ws.hashes.sha256(out)),
        command=command, seconds=seconds, runs=search.runs)

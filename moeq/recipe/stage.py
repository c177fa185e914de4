"""The recipe stage: a rung's per-tensor types, searched on measured KL divergence under a budget.

For a rung with `recipe: search` it quantizes the F16 once per type it may use (`--pure`, with the
importance matrix where the rung has one; WORKSPACE/recipe/pure/), then measures recipes assembled from
those files tensor by tensor (recipe/assemble.py, byte for byte what llama-quantize would make) against
the F16 logits on the selection text: the stock recipe (the rung's own llama.cpp mixture), the stock
recipe with each group one type higher and one lower, and the recipe those figures predict is best
under the budget (recipe/search.py). Of every recipe measured that fits the budget, the lowest mean KL
divergence is chosen. Each measurement is saved as it is made (WORKSPACE/recipe/TYPE/evals/, by the recipe,
the options and the per-type files' sha256), so an interrupted search continues where it stopped and a
finished one costs nothing.

It writes the chosen recipe as a `--tensor-type-file` (WORKSPACE/recipe/TYPE/<stem>-TYPE_MOEQ.recipe), the
assembled file beside it (the choice stage has llama-quantize make it again from the recipe file, checks that
the two are the same bytes, and deletes this one), and a RecipeRecord with every measurement and the one
llama-quantize command that rebuilds the file. Its key is the source, the importance matrix, the stock file,
the selection options, the budget and the search settings.

    result = run_stage(recipe_stage(pipeline, quant, ws, chain, fetched, stock, on_message=print), records)
    result.record.evals[result.record.chosen].quality.kld_mean
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import gguf
from gguf import Keys

from moeq.config import Pipeline, QuantSpec
from moeq.config.yaml_nodes import MAX_TEXT_BYTES
from moeq.errors import InputError, ToolError
from moeq.gguf_header import read_header
from moeq.imatrix_file import default_calibration
from moeq.memory_plan import DEFAULT_COMPUTE_ALLOWANCE, kv_bytes, on_gpu
from moeq.kld import base_logits, eval_text, figure_lines, measure, parse_perplexity
from moeq.quant_types import lookup
from moeq.records import (FileRef, ImatrixRef, PerplexityFigures, PerplexityOptions, QuantizeRecord, FetchRecord,
                          RecipeEval, RecipeGroup, RecipeRecord, ToolBuildRef)
from moeq.recipe.assemble import assemble
from moeq.recipe.search import TYPE_LADDER, Group, Option, groups_of, predicted, recipe_lines, solve, stepped
from moeq.runner import run_tool
from moeq.seal import seal_json, unseal_json
from moeq.units import binary_size
from moeq.stage_runner import Stage
from moeq.toolchain import Toolchain
from moeq.workspace import (Workspace, partial_file, read_text_limited, require_free, write_json_atomic,
                            write_text_atomic)

UNQUANTIZED = {"F32", "F16", "BF16"}
_RUNGS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")  # the rungs whose --pure base type is on the ladder


def default_selection_text() -> Path:
    return Path(str(resources.files("moeq.data") / "selection.txt"))


def base_type(quant: str) -> str:
    """The tensor type `--pure` gives a rung's tensors: Q4_K for Q4_K_M (the same general.file_type)."""
    name = quant.removesuffix("_M")
    known, own = lookup(name), lookup(quant)
    if name not in TYPE_LADDER or known is None or own is None or known.file_type != own.file_type:
        raise InputError(f"quants[{quant}].recipe: a searched recipe is for {', '.join(_RUNGS)}; {quant} is not one")
    return name



@dataclass(frozen=True)
class Plan:
    """What a search will cost, printed before it starts."""

    groups: int
    runs: int  # llama-perplexity runs at most (recipe.max_evals bounds it)
    tokens: int  # tokens each run evaluates
    pure_types: tuple[str, ...]
    pure_bytes: int  # the per-type files, on disk while the search runs
    budget_bytes: int  # 0 when not known yet (a plan from the header alone)

    def describe(self) -> str:
        return (f"{self.groups} tensor groups; up to {self.runs} llama-perplexity runs of {self.tokens:,} tokens; "
                f"{len(self.pure_types)} --pure quantizations ({', '.join(self.pure_types)}), "
                f"{self.pure_bytes / 1e9:.2f} GB on disk while it runs")

    def as_dict(self) -> dict:
        return {"groups": self.groups, "runs": self.runs, "tokens_per_run": self.tokens,
                "pure_types": list(self.pure_types), "pure_bytes": self.pure_bytes, "budget_bytes": self.budget_bytes}


BITS = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5}  # per weight


def plan_search(pipeline: Pipeline, quant: QuantSpec, source: Path) -> Plan:
    """The most a search of `quant` costs, from the source's header alone: its groups, llama-perplexity runs
    (recipe.max_evals bounds them), tokens per run, and the per-type files (every type of the ladder at most)."""
    base_type(quant.type)
    header = read_header(source)
    weights = {t.name: t.n_elements for t in header.tensors if len(t.shape) >= 2 and "ffn_gate_inp" not in t.name}
    n_layer = header.arch_value(Keys.LLM.BLOCK_COUNT) or 1
    groups = groups_of({name: TYPE_LADDER[0] for name in weights}, n_layer, layers_per_group(pipeline, n_layer))
    cfg = pipeline.recipe
    return Plan(len(groups), planned_runs(pipeline, groups), cfg.ctx * cfg.chunks, TYPE_LADDER,
                int(sum(weights.values()) * sum(BITS.values()) / 8), 0)


def layers_per_group(pipeline: Pipeline, n_layer: int) -> int:
    """recipe.layers_per_group, or a band per eighth of the model (one layer for a model of up to 8)."""
    return pipeline.recipe.layers_per_group or max(1, math.ceil(n_layer / 8))


def planned_runs(pipeline: Pipeline, groups: list[Group]) -> int:
    """The stock recipe, each group up and down, and the solution: recipe.max_evals at most."""
    return min(pipeline.recipe.max_evals, 2 + 2 * len(groups))


def selection_options(pipeline: Pipeline, ws: Workspace) -> tuple[Path, PerplexityOptions]:
    text = pipeline.recipe.selection or default_selection_text()
    cfg = pipeline.recipe
    return text, PerplexityOptions(text=text.name, text_sha256=ws.hashes.sha256(text), ctx=cfg.ctx, chunks=cfg.chunks)


def budget_bytes(quant: QuantSpec, stock: QuantizeRecord) -> int:
    budget = quant.budget
    if budget is None or budget.kind in ("stock", "gpu"):
        return sum(row.bytes_after for row in stock.tensors)
    if budget.kind == "bpw":
        elements = sum(math.prod(row.shape) for row in stock.tensors)
        return int(budget.value * elements / 8)
    return int(budget.value)


def gpu_room(quant: QuantSpec, source: Path) -> tuple[int | None, int]:
    """A GPU budget's room for the tensors on the GPU (the budget less the KV cache at its context and the memory
    plan's compute allowance), and the layers whose experts its placement keeps in system RAM; (None, 0) without
    one."""
    budget = quant.budget
    if budget is None or budget.kind != "gpu":
        return None, 0
    header = read_header(source)
    n_layer = header.arch_value(Keys.LLM.BLOCK_COUNT) or 0
    kv = kv_bytes(header, budget.ctx)
    room = int(budget.value) - kv - DEFAULT_COMPUTE_ALLOWANCE
    if room <= 0:
        raise InputError(f"quants[{quant.type}].budget.gpu: {budget.value / 2**30:g} GiB holds no weights: the KV "
                         f"cache at context {budget.ctx:,} ({binary_size(kv)}) and the compute allowance "
                         f"({binary_size(DEFAULT_COMPUTE_ALLOWANCE)}) take it all; raise gpu or lower ctx")
    return room, n_layer if budget.placement == "cpu-moe" else 0


def recipe_stage(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, chain: Toolchain, source: FetchRecord,
                 stock: QuantizeRecord, *, on_message: Callable[[str], None] = lambda _msg: None
                 ) -> Stage[RecipeRecord]:
    """Search `quant`'s recipe; `stock` is the rung's stock file, made with the importance matrix the search uses."""
    base = base_type(quant.type)
    tool = chain.tool("llama-quantize")
    text, options = selection_options(pipeline, ws)
    settings = pipeline.recipe
    limit = budget_bytes(quant, stock)
    room, n_cpu_moe = gpu_room(quant, Path(source.output.path))
    stock_types = {row.name: row.type_after for row in stock.tensors if row.type_after not in UNQUANTIZED}
    off_ladder = sorted({t for t in stock_types.values() if t not in TYPE_LADDER})
    if off_ladder:
        raise InputError(f"{stock.output.path}: the stock {quant.type} has tensors of type {', '.join(off_ladder)}, "
                         f"which a searched recipe does not use ({', '.join(TYPE_LADDER)})")
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
        _require_text(text, options, pipeline)
        needed = sorted({n for t in [*stock_types.values(), base] for n in _neighbours(t)}, key=TYPE_LADDER.index)
        pure = _pure_files(ws, chain, tool, source, stock.options.imatrix, needed, on_message)
        sizes = {t: {info.name: info.n_bytes for info in read_header(path).tensors} for t, path in pure.items()}
        fixed = sum(row.bytes_after for row in stock.tensors if row.name not in stock_types)
        _require_reachable(quant, limit, fixed, sizes, stock_types, needed[0])
        gpu = _GpuCount(stock, stock_types, sizes, n_cpu_moe) if room is not None else None
        if gpu is not None:
            _require_gpu_reachable(quant, room, gpu, stock_types)
        base_kld, _base = base_logits(ws, chain, source.output, options, text, tool.build.commit, purpose="selection",
                                      threads=pipeline.bench.threads, timeout_s=pipeline.bench.timeout_s,
                                      on_message=on_message)
        plan = Plan(len(groups), planned_runs(pipeline, groups), options.ctx * options.chunks,
                    tuple(needed), sum(p.stat().st_size for p in pure.values()), limit)
        search = _Search(ws, chain, folder, pure, base, options, text, base_kld, sizes, fixed, stock_types,
                         pipeline, plan.runs, on_message, gpu)
        on_message(f"{quant.type}: recipe search, {plan.describe()}; budget {limit:,} bytes"
                   + (f", {room:,} bytes of weights on the GPU" if room is not None else ""))
        stock_eval = search.evaluate("stock", {})
        options_by_group: dict[str, list[Option]] = {}
        # the largest groups first; under a GPU budget the groups on the GPU before them: they must fit it
        order = sorted(groups, key=lambda g: (gpu is not None and not set(g.tensors) & set(gpu.names),
                                              -sum(sizes[base].get(n, 0) for n in g.tensors)))
        for group in order:
            opts = [Option(group.name, 0, (), 0, stock_eval.quality.kld_mean, stock_eval.quality.kld_mean_err)]
            for step, word in ((1, "up"), (-1, "down")):
                types = stepped(stock_types, group, step)
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
            changes = {name: t for o in chosen.values() for name, t in o.types}
            search.evaluate("solution", changes)
        fits = [i for i, e in enumerate(search.evals)
                if e.tensor_bytes <= limit and (room is None or e.gpu_bytes <= room)]
        if not fits:
            raise InputError(f"quants[{quant.type}].budget: {limit:,} bytes"
                             + (f" ({room:,} on the GPU)" if room is not None else "")
                             + ", and no measured recipe fits it (the search moves each group one type from the "
                               "stock file); raise the budget"
                             + (f", or recipe.max_evals ({settings.max_evals} runs did not measure every group)"
                                if any(len(o) == 1 for o in options_by_group.values()) else ""))
        # the solution wins a tie: it is the same recipe as a single-group one when only that group changed
        best = min(fits, key=lambda i: (search.evals[i].quality.kld_mean, search.evals[i].label != "solution"))
        tensor_types = {**stock_types, **search.evals[best].changes}
        return _record(quant, base, limit, room, source, stock, options, tool, groups, stock_types, search, best,
                       predicted_kld if search.evals[best].label == "solution" else None, tensor_types, pure, folder,
                       started)

    return Stage("recipe", quant.type, key=key, run=run, tool=lambda: tool, intact=lambda r: _intact(ws, r))


def _neighbours(ggml_type: str) -> list[str]:
    rung = TYPE_LADDER.index(ggml_type)
    return [TYPE_LADDER[i] for i in (rung - 1, rung, rung + 1) if 0 <= i < len(TYPE_LADDER)]


def _require_reachable(quant: QuantSpec, limit: int, fixed: int, sizes: dict, stock_types: dict[str, str],
                       lowest: str) -> None:
    """Refuse, before measuring anything, a budget below every tensor at the lowest type, or below what the
    search can reach (every group one type down from the stock file)."""
    floor = fixed + sum(sizes[lowest][name] for name in stock_types)
    if limit < floor:
        raise InputError(f"quants[{quant.type}].budget: {limit:,} bytes, less than any recipe can weigh (every "
                         f"tensor {lowest}: {floor:,} bytes); raise the budget")
    reach = fixed + sum(sizes[_neighbours(t)[0]][name] for name, t in stock_types.items())
    if limit < reach:
        raise InputError(f"quants[{quant.type}].budget: {limit:,} bytes, less than the search reaches (every tensor "
                         f"one type below the stock {quant.type}: {reach:,} bytes); raise the budget or search a "
                         "lower rung")


class _GpuCount:
    """The bytes a recipe puts on the GPU under a GPU budget's placement: the unquantized tensors there, and each
    quantized one there at its type."""

    def __init__(self, stock: QuantizeRecord, stock_types: dict[str, str], sizes: dict, n_cpu_moe: int):
        self.names = [name for name in stock_types if on_gpu(name, n_cpu_moe)]
        self.fixed = sum(row.bytes_after for row in stock.tensors
                         if row.name not in stock_types and on_gpu(row.name, n_cpu_moe))
        self.sizes = sizes

    def bytes(self, types: dict[str, str]) -> int:
        return self.fixed + sum(self.sizes[types[name]][name] for name in self.names)


def _require_gpu_reachable(quant: QuantSpec, room: int, gpu: _GpuCount, stock_types: dict[str, str]) -> None:
    """Refuse, before measuring, a GPU room the search cannot reach: it moves each tensor one type from the stock
    file's, so the weights on the GPU weigh at least what they do one type below it."""
    reach = gpu.bytes({name: _neighbours(t)[0] for name, t in stock_types.items()})
    if reach > room:
        raise InputError(f"quants[{quant.type}].budget: {room:,} bytes for the weights on the GPU (after the KV cache "
                         f"and the compute allowance), less than the search reaches (every tensor there one type "
                         f"below the stock {quant.type}: {reach:,} bytes); raise gpu, lower ctx, use placement: "
                         "cpu-moe, or search a lower rung")


def _require_text(text: Path, options: PerplexityOptions, pipeline: Pipeline) -> None:
    """The selection text: long enough for two chunks, and sharing no line with the evaluation text (whose figures
    the search must not have seen) or the calibration text."""
    if text.stat().st_size + 1 < 2 * 2 * options.ctx:
        raise InputError(f"{text}: too short for two chunks of {options.ctx} tokens (recipe.selection); use a longer "
                         "text or a smaller recipe.ctx")
    calibration = pipeline.imatrix.calibration or default_calibration()
    lines = _lines(text)
    for other, key in ((eval_text(pipeline), "bench.perplexity.text"), (calibration, "imatrix.calibration")):
        shared = sorted(lines & _lines(other))
        if shared:
            raise InputError(f"{text}: shares {len(shared)} line{'s' if len(shared) > 1 else ''} with {other} ({key}), "
                             f"e.g. {shared[0][:60]!r}; the selection text must be one the published figures and the "
                             "importance matrix were not made from (recipe.selection)")


def _lines(path: Path) -> set[str]:
    """Its lines of text: 40 characters or more, 20 of them letters or digits (not a table's border)."""
    text = read_text_limited(path, MAX_TEXT_BYTES, "text file of at most 256 MB")
    return {line.strip() for line in text.splitlines()
            if len(line.strip()) >= 40 and sum(c.isalnum() for c in line) >= 20}


def _intact(ws: Workspace, record: RecipeRecord) -> bool:
    """The recipe file is as the record says (the assembled file is deleted once llama-quantize made it again)."""
    ref = record.recipe_file
    return Path(ref.path).is_file() and ws.hashes.sha256(Path(ref.path)) == ref.sha256


def _pure_files(ws: Workspace, chain: Toolchain, tool, source: FetchRecord, imatrix: ImatrixRef | None,
                types: list[str], on_message: Callable[[str], None]) -> dict[str, Path]:
    """One `--pure` quantization of the source per type (token_embd and output typed too), kept by what they are
    made from, so every rung's search shares them; made only when missing or changed."""
    key = hashlib.sha256(json.dumps([source.output.sha256, imatrix.sha256 if imatrix else None,
                                     tool.build.commit]).encode()).hexdigest()[:16]
    folder = ws.root / "recipe" / "pure" / key
    folder.mkdir(parents=True, exist_ok=True)
    made_path = folder / "made.json"
    made = json.loads(made_path.read_text()) if made_path.is_file() else {}
    out = {}
    for ggml_type in types:
        path = folder / f"{ggml_type}.gguf"
        with ws.lock(f"pure-{key}-{ggml_type}", on_wait=on_message):
            if not (path.is_file() and made.get(ggml_type) == ws.hashes.sha256(path)):
                on_message(f"llama-quantize --pure {ggml_type}")
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
                weights = source.output.size / 2  # the F16 holds 2 bytes a weight
                require_free(folder, weights * size / block, f"the --pure {ggml_type} file")
                command = [str(tool.path), "--pure", "--token-embedding-type", ggml_type.lower(),
                           "--output-tensor-type", ggml_type.lower()]
                if imatrix is not None:
                    command += ["--imatrix", Path(imatrix.path).name]
                with partial_file(path) as partial:
                    run_tool([*command, str(Path(source.output.path).resolve()), str(partial.resolve()), ggml_type],
                             folder / f"{ggml_type}.log", cwd=Path(imatrix.path).resolve().parent if imatrix else None)
                made[ggml_type] = ws.hashes.sha256(path)
                write_json_atomic(made_path, made)
        out[ggml_type] = path
    return out


class _Search:
    """Measures recipes on the selection text, each once: a measurement is saved (by what it depends on) the
    moment it is made, and found again by an interrupted search that runs again."""

    def __init__(self, ws, chain, folder, pure, base, options, text, base_kld, sizes, fixed, stock_types, pipeline,
                 planned_runs, on_message, gpu: _GpuCount | None = None):
        self.ws, self.chain, self.folder, self.pure, self.base = ws, chain, folder, pure, base
        self.options, self.text, self.base_kld, self.sizes, self.fixed = options, text, base_kld, sizes, fixed
        self.stock_types, self.pipeline, self.on_message = stock_types, pipeline, on_message
        self.evals: list[RecipeEval] = []
        self.planned_runs = planned_runs
        self.runs = 0
        self.seconds: list[float] = []  # each llama-perplexity run's wall time in this search
        self.settings = pipeline.recipe
        self.gpu = gpu
        (folder / "evals").mkdir(parents=True, exist_ok=True)

    def runs_left(self) -> int:
        return self.settings.max_evals - len(self.evals)

    def _saved(self, saved: Path, digest: str) -> PerplexityFigures | None:
        """A measurement this machine's moeq saved for `digest`: sealed by it, for this recipe, and re-parsed from the
        tool's own output lines. Anything else (edited, cut short, another recipe's) is None: measured again."""
        payload = unseal_json(saved)
        if not isinstance(payload, dict) or payload.get("digest") != digest:
            return None
        output, command = payload.get("output"), payload.get("command")
        if not (isinstance(output, list) and all(isinstance(line, str) for line in output)
                and isinstance(command, list) and all(isinstance(arg, str) for arg in command)):
            return None
        try:
            figures = PerplexityFigures(command=command, **parse_perplexity("\n".join(output)))
        except ValueError:
            return None
        return figures if figures.kld_mean is not None else None

    def evaluate(self, label: str, changes: dict[str, str]) -> RecipeEval:
        types = {**self.stock_types, **changes}
        tensor_bytes = self.fixed + sum(self.sizes[t][name] for name, t in types.items())
        digest = hashlib.sha256(json.dumps([sorted(types.items()), self.options.model_dump(mode="json"),
                                            {t: self.ws.hashes.sha256(p) for t, p in self.pure.items()}]
                                           ).encode()).hexdigest()[:20]
        saved = self.folder / "evals" / f"{digest}.json"
        figures = self._saved(saved, digest)
        if figures is None:
            left = ""
            if self.seconds:  # the time a run takes on this machine, measured, not assumed
                per_run = sum(self.seconds) / len(self.seconds)
                left = (f" (about {(self.planned_runs - len(self.evals)) * per_run / 60:.1f} min left at "
                        f"{per_run:.1f} s a run here)")
            self.on_message(f"recipe {len(self.evals) + 1} of at most {self.planned_runs}: {label}{left}")
            started = time.monotonic()
            candidate = self.folder / "candidate.gguf"
            assemble(self.pure[self.base], self.pure, {n: t for n, t in types.items() if t != self.base}, candidate)
            try:
                figures = measure(self.chain, candidate, self.text, self.base_kld, self.options,
                                  self.folder / "perplexity.log", threads=self.pipeline.bench.threads,
                                  timeout_s=self.pipeline.bench.timeout_s)
            finally:
                candidate.unlink(missing_ok=True)
            if figures.kld_mean is None:
                raise ToolError(f"llama-perplexity gave no mean KL divergence for recipe {label}; see "
                                f"{self.folder / 'perplexity.log'}")
            log = (self.folder / "perplexity.log").read_text(encoding="utf-8", errors="replace")
            write_text_atomic(saved, seal_json({"digest": digest, "command": figures.command,
                                                "output": figure_lines(log)}))
            self.runs += 1
            self.seconds.append(time.monotonic() - started)
        measured = RecipeEval(label=label, changes={n: t for n, t in changes.items() if t != self.stock_types[n]},
                              tensor_bytes=tensor_bytes, quality=figures,
                              gpu_bytes=self.gpu.bytes(types) if self.gpu is not None else None)
        self.evals.append(measured)
        return measured


def _record(quant, base, limit, room, source, stock, options, tool, groups: list[Group], stock_types, search: _Search,
            best: int, predicted_kld, tensor_types, pure, folder: Path, started: float) -> RecipeRecord:
    embd = tensor_types.get("token_embd.weight", base)
    output = tensor_types.get("output.weight", embd)
    stem = Path(quant.searched_file).stem
    recipe_path = folder / f"{stem}.recipe"
    lines = recipe_lines(tensor_types, base)
    write_text_atomic(recipe_path, "".join(f"{pattern}={ggml_type}\n" for pattern, ggml_type in lines))
    out = folder / quant.searched_file
    assemble(pure[base], pure, {n: t for n, t in tensor_types.items() if t != base}, out)
    imatrix = stock.options.imatrix
    command = ["llama-quantize", "--pure", *(["--imatrix", Path(imatrix.path).name] if imatrix else []),
               "--tensor-type-file", recipe_path.name, "--token-embedding-type", embd.lower(),
               "--output-tensor-type", output.lower(), Path(source.output.path).name, quant.searched_file, quant.type]
    return RecipeRecord(
        quant=quant.type, base_type=base, budget=quant.budget.describe() if quant.budget else "stock",
        budget_bytes=limit, gpu_budget_bytes=room, source=source.output, imatrix=imatrix, selection=options,
        tool=ToolBuildRef(**tool.build.as_dict()), types=list(TYPE_LADDER),
        groups=[RecipeGroup(name=g.name, tensors=list(g.tensors)) for g in groups], stock_types=stock_types,
        evals=search.evals, chosen=best, predicted_kld=predicted_kld, tensor_types=tensor_types,
        token_embedding_type=embd, output_tensor_type=output,
        recipe_file=FileRef(path=str(recipe_path), size=recipe_path.stat().st_size,
                            sha256=search.ws.hashes.sha256(recipe_path)),
        output=FileRef(path=str(out), size=out.stat().st_size, sha256=search.ws.hashes.sha256(out)),
        command=command, seconds=round(time.monotonic() - started, 1), runs=search.runs)


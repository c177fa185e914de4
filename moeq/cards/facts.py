"""Records manifest -> the plain dict of facts a card template formats.

Every figure is formatted here, once, from a record value; the template only lays them out.
A section whose record is absent is None, and the template says "not measured".

    facts = card_facts(read_manifest(Path("work/repos/Q8_0/moeq-manifest.json")))
    facts["quant"]["bpw"]
    # -> '8.50'
"""

from __future__ import annotations

import math
import re
import shlex
from collections import Counter

from moeq.config import Layout
from moeq.cards.charts import charts
from moeq.cards.render import code
from moeq.kld import compare
from moeq.manifest import LadderEntry, Manifest, ModelCardSpec, QuantEntry
from moeq.offload import OffloadMode
from moeq.records import (Made, BenchRecord, ChoiceRecord, Fit, ModelFacts, PerplexityFigures,
                          QuantizeRecord, FetchRecord, SpeedRun, ValidateRecord, WorstTensor)
from moeq.units import binary_size, decimal_size, short_count

HUB = "https://huggingface.co"
LLAMA_CPP_REPO = "https://github.com/ggml-org/llama.cpp"
TAGS = ("gguf", "quantized", "moe", "mixture-of-experts", "cpu-offload", "text-generation")

# What each quant of a ladder is for: words, not figures (the figures come from records).
QUANT_ADVICE = {
    "Q8_0": "highest quality of the ladder, close to F16; the largest file",
    "Q6_K": "very close to Q8_0 quality in three quarters of its size",
    "Q5_K_M": "high quality with a clearly smaller file than Q8_0",
    "Q4_K_M": "the usual balance of size and quality",
    "Q3_K_M": "small, with a visible quality loss",
    "Q2_K": "the smallest file, for tight RAM; the largest quality loss",
}


def hub_url(repo_id: str) -> str:
    return f"{HUB}/{repo_id}"


def card_facts(manifest: Manifest) -> dict:
    """Everything a card can say, from the manifest alone."""
    model_spec = manifest.pipeline.model
    single = manifest.layout == Layout.SINGLE
    quants = [_quant_facts(manifest, entry) for entry in manifest.quants]
    first = manifest.quants[0].records.quantize
    return {
        "generator": manifest.generator,
        "frontmatter": {
            "license": model_spec.license,
            "language": list(model_spec.languages),
            "base_model": model_spec.base_model,
            "base_model_relation": "quantized",
            "quantized_by": model_spec.quantized_by,
            "pipeline_tag": "text-generation",
            "tags": [*TAGS, *(q["type"] for q in quants)],
        },
        "single": single,
        "repo": {"id": manifest.repo_id, "url": hub_url(manifest.repo_id)},
        "model": _model(model_spec, first.model),
        "llama_cpp": {"commit": first.tool.commit, "commit_url": f"{LLAMA_CPP_REPO}/commit/{first.tool.commit}",
                      "log_flush": _log_flush(manifest)},
        "quants": quants,
        "quant": quants[0],  # the repo's one quant (per-quant layout), or the ladder's first
        "choose": _choose(manifest.quants),
        "context": _context(manifest.quants, first.model.context_length),
        "charts": [{"path": c.path, "alt": c.alt, "url": f"{hub_url(manifest.repo_id)}/resolve/main/{c.path}"}
                   for c in charts(manifest)],
        "imatrix_files": list({q["imatrix"]["file"]: q["imatrix"] for q in quants if q["imatrix"]}.values()),
        "siblings": [_sibling(row) for row in manifest.siblings],
        "license_file": {"name": manifest.license_file.name,
                         "url": f"{hub_url(manifest.repo_id)}/blob/main/{manifest.license_file.name}"}
        if manifest.license_file else None,
        "extra": dict(manifest.pipeline.card_extra),
    }


def _quant_facts(manifest: Manifest, entry: QuantEntry) -> dict:
    records = entry.records
    quantized = records.quantize
    return {
        **_quant(manifest, entry, quantized),
        "memory": _memory(records.validate_),
        "validation": _validation(records.validate_),
        "quantization": _quantization(quantized, manifest.source),
        "imatrix": _imatrix(manifest, entry),
        **_bench(records.bench, quantized.model.block_count, records.choice),
        "recipe": _recipe(manifest, entry),
    }


def _model(spec: ModelCardSpec, model: ModelFacts) -> dict:
    return {
        "name": spec.name,
        "base_model": spec.base_model,
        "base_model_url": hub_url(spec.base_model),
        "license": spec.license,
        "quantized_by": spec.quantized_by,
        "architecture": model.architecture,
        "parameters": short_count(model.parameters),
        "parameters_exact": f"{model.parameters:,}",
        "blocks": model.block_count,
        "experts": model.expert_count,
        "experts_used": model.expert_used_count,
        "context_length": model.context_length,
        "expert_tensors": model.expert_tensors,
        "shared_experts": model.shared_experts,
    }


def _quant(manifest: Manifest, entry: QuantEntry, quantized: QuantizeRecord) -> dict:
    repo_id = manifest.repo_id
    single = manifest.layout == Layout.SINGLE
    files = [{"name": f.name, "size": decimal_size(f.size), "sha256": f.sha256,
              "url": f"{hub_url(repo_id)}/resolve/main/{f.name}"} for f in entry.files]
    first = files[0]["name"]  # the first shard when split: llama.cpp loads the rest from it
    sharded = len(files) > 1
    if sharded and "/" in first:
        include = first.rsplit("/", 1)[0] + "/*"
    else:
        include = re.sub(r"-\d{5}-of-(\d{5})\.gguf$", r"-*-of-\1.gguf", first)
    label = entry.label
    tag = f"{repo_id}:{label}" if single else repo_id
    return {
        "type": entry.quant,
        "label": label,  # the file's quant label: TYPE_MOEQ for a searched recipe
        "recipe_file": None if entry.recipe_file is None else {
            "name": entry.recipe_file.name, "sha256": entry.recipe_file.sha256,
            "url": f"{hub_url(repo_id)}/resolve/main/{entry.recipe_file.name}"},
        "advice": QUANT_ADVICE.get(entry.quant, ""),
        "file_type": quantized.file_type,
        "files": files,
        "file": first,
        "local_path": f"models/{first}",
        "sharded": sharded,
        "shard_count": len(files),
        "download_pattern": include,
        "hf_tag": tag,  # llama.cpp's -hf and Ollama's hf.co/ name for this quant
        "size": decimal_size(sum(f.size for f in entry.files)),
        "bpw": f"{quantized.quant_bpw:.2f}",
        "source_bpw": f"{quantized.model_bpw:.2f}",
        "source_size": decimal_size(quantized.source.size),
    }


def _sibling(row: LadderEntry) -> dict:
    return {
        "quant": row.quant,
        "repo_id": row.repo_id,
        "url": hub_url(row.repo_id),
        "file": row.file,
        "size": decimal_size(row.size) if row.size is not None else None,
        "bpw": f"{row.bpw:.2f}" if row.bpw is not None else None,
        "cpu_moe_vram": binary_size(row.cpu_moe_gpu_bytes) if row.cpu_moe_gpu_bytes is not None else None,
        "advice": QUANT_ADVICE.get(row.quant, ""),
    }


def _choose(entries: list[QuantEntry]) -> dict | None:
    """"Which file should I choose?": for each GPU size of the plans, each quant's smallest expert offload that fits
    at the first configured context, with the system RAM its weights then need, and the generation speed and KLD
    where the bench measured them. GPU sizes where every quant's choice is the same share a row group."""
    plans = _plans(entries)
    if not plans:
        return None
    ctx = plans[0].fits[0].ctx
    sizes = sorted({f.gpu_gib for plan in plans for f in plan.fits})
    groups: list[tuple[list[int], list[dict]]] = []
    for gib in sizes:
        rows = [_choice(entry, gib, ctx) for entry in entries]
        if groups and [r["key"] for r in groups[-1][1]] == [r["key"] for r in rows]:
            groups[-1][0].append(gib)
        else:
            groups.append(([gib], rows))
    return {"ctx": ctx, "kv_type": plans[0].kv_type, "allowance": binary_size(plans[0].compute_allowance_bytes),
            "groups": [{"gpu": _gpu_label(gibs, gibs[-1] == sizes[-1]), "rows": rows} for gibs, rows in groups]}


def _plans(entries: list[QuantEntry]) -> list:
    """The memory plans of the quants that have one (a validation record), in ladder order; the first plan's first
    context is the one the card's figures and snippets assume."""
    return [e.records.validate_.plan for e in entries if e.records.validate_ is not None]


def _context(entries: list[QuantEntry], trained: int | None) -> dict | None:
    """The context every usage snippet passes (-c), the one the memory figures assume, and how the KV cache
    grows with it (linearly: the same bytes per token at every context)."""
    plans = _plans(entries)
    if not plans:
        return None
    ctx = plans[0].fits[0].ctx
    per_token = plans[0].kv_bytes[ctx] / ctx
    return {"ctx": ctx, "kv": binary_size(plans[0].kv_bytes[ctx]), "kv_type": plans[0].kv_type,
            "per_1024": binary_size(per_token * 1024),
            "trained": trained, "kv_trained": binary_size(per_token * trained) if trained else None}


def _gpu_label(gibs: list[int], last: bool) -> str:
    if len(gibs) == 1:
        return f"{gibs[0]} GiB"
    return f"{gibs[0]} GiB or more" if last else f"{gibs[0]} to {gibs[-1]} GiB"


def _choice(entry: QuantEntry, gib: int, ctx: int) -> dict:
    quality = entry.records.bench.quality if entry.records.bench else None
    kld = _pm(quality.quant, "kld_mean", 6) if quality else "not measured"
    row = {"quant": entry.quant, "size": decimal_size(sum(f.size for f in entry.files)), "kld": kld}
    plan = entry.records.validate_.plan if entry.records.validate_ else None
    if plan is None:
        return {**row, "key": "no plan", "placement": "not computed (no validation record)", "gpu": "", "ram": "",
                "speed": ""}
    fit = next((f for f in plan.fits if f.gpu_gib == gib and f.ctx == ctx), None)
    if fit is None or fit.n_cpu_moe is None:
        return {**row, "key": None, "placement": "does not fit", "gpu": "", "ram": "", "speed": ""}
    mode = OffloadMode.for_layers(fit.n_cpu_moe, plan.n_layer)
    return {**row, "key": fit.n_cpu_moe, "placement": mode.advice if mode.name == "gpu" else code(mode.advice),
            "gpu": binary_size(fit.gpu_bytes), "ram": binary_size(plan.placement(fit.n_cpu_moe).cpu_bytes),
            "speed": _generation_speed(entry.records.bench, mode.name)}


def _generation_speed(bench: BenchRecord | None, mode: str) -> str:
    """Tokens per second generating (llama-bench's tg test) in `mode`, where the bench measured it."""
    for run in bench.speed if bench else []:
        if run.mode == mode:
            for test in run.tests:
                if test.test.startswith("tg"):
                    return f"{test.avg_ts:.2f} ± {test.stddev_ts:.2f}"
    return "not measured"


def _memory(validated: ValidateRecord | None) -> dict | None:
    if not validated:
        return None
    plan = validated.plan
    n_layer = plan.n_layer
    advised = sorted({f.n_cpu_moe for f in plan.fits if f.n_cpu_moe not in (None, 0, n_layer)})
    modes = [OffloadMode.for_layers(n, n_layer) for n in (0, n_layer, *advised)]
    contexts = sorted(plan.kv_bytes)
    gpu_sizes = sorted({f.gpu_gib for f in plan.fits})
    advice = {(f.gpu_gib, f.ctx): f for f in plan.fits}
    example = next((f for f in plan.fits if f.n_cpu_moe not in (None, 0, n_layer)), None)
    return {
        "kv_type": plan.kv_type,
        "compute_allowance": binary_size(plan.compute_allowance_bytes),
        "modes": [{"label": m.label, "flags": m.flags, "gpu": binary_size(plan.placement(m.n_cpu_moe).gpu_bytes),
                   "ram": binary_size(plan.placement(m.n_cpu_moe).cpu_bytes)} for m in modes],
        "kv": [{"ctx": ctx, "size": binary_size(plan.kv_bytes[ctx])} for ctx in contexts],
        "contexts": contexts,
        "fits": [{"gpu": f"{gib} GiB",
                  "cells": [_fit_cell(advice[(gib, ctx)], n_layer) for ctx in contexts]} for gib in gpu_sizes],
        "ncmoe_example": {"n": example.n_cpu_moe, "gpu": f"{example.gpu_gib} GiB", "ctx": example.ctx}
        if example else None,
        "blocks": n_layer,
    }


def _fit_cell(fit: Fit, n_layer: int) -> str:
    if fit.n_cpu_moe is None:
        return "does not fit"
    mode = OffloadMode.for_layers(fit.n_cpu_moe, n_layer)
    return (mode.advice if mode.name == "gpu" else code(mode.advice)) + f" ({binary_size(fit.gpu_bytes)})"


def _validation(validated: ValidateRecord | None) -> dict | None:
    if not validated:
        return None
    worst_by_type: dict[str, WorstTensor] = {}
    for row in validated.worst_tensors:
        kept = worst_by_type.get(row.type)
        if kept is None or row.rel_rmse > kept.rel_rmse:
            worst_by_type[row.type] = row
    return {
        "numerics": validated.numerics,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in validated.checks],
        "worst": [{"type": t, "tensor": r.name, "rel_rmse": f"{r.rel_rmse:.4f}",
                   "bound": f"{r.bound:.3f}" if r.bound is not None else "none"} for t, r in sorted(worst_by_type.items())],
    }


def _log_flush(manifest: Manifest) -> str | None:
    """How many of the llama.cpp runs behind the records had moeq's log flush at exit: "all", "some" or None."""
    tools = [record.tool for entry in manifest.quants
             for record in (entry.records.imatrix, entry.records.choice, entry.records.recipe, entry.records.quantize,
                            entry.records.bench) if record is not None]
    flushed = sum(tool.log_flush is not None for tool in tools)
    return "all" if flushed == len(tools) else ("some" if flushed else None)


def _quantization(quantized: QuantizeRecord, source: FetchRecord | None) -> dict:
    tool = quantized.tool
    mix: Counter = Counter()
    mix_bytes: Counter = Counter()
    for row in quantized.tensors:
        mix[row.type_after] += 1
        mix_bytes[row.type_after] += row.bytes_after
    options = quantized.options
    return {
        "command": shlex.join(["llama-quantize", *quantized.command[1:]]),
        "llama_cpp": {"version": tool.version, "commit": tool.commit, "log_flush": tool.log_flush,
                      "commit_url": f"{LLAMA_CPP_REPO}/commit/{tool.commit}"},
        "overrides": [f"{k}={v}" for k, v in options.tensor_types.items()]
        + ([f"output={options.output_tensor_type}"] if options.output_tensor_type else [])
        + ([f"token_embd={options.token_embedding_type}"] if options.token_embedding_type else []),
        "source": {"file": quantized.source.path, "sha256": quantized.source.sha256,
                   "size": decimal_size(quantized.source.size),
                   "origin": source.origin if source else None, "kind": source.kind if source else None},
        "output_sha256": quantized.output.sha256,
        "type_mix": [{"type": t, "tensors": mix[t], "size": binary_size(mix_bytes[t])}
                     for t in sorted(mix, key=lambda t: -mix_bytes[t])],
        "tensors": len(quantized.tensors),
    }


def _imatrix(manifest: Manifest, entry: QuantEntry) -> dict | None:
    """The importance matrix the file was made with: published beside it; how it was made when moeq made it."""
    published = entry.imatrix_file
    if published is None:
        return None
    facts = {"file": published.name, "size": decimal_size(published.size), "sha256": published.sha256,
             "url": f"{hub_url(manifest.repo_id)}/resolve/main/{published.name}", "made": None}
    record = entry.records.imatrix
    if record is None:
        return facts
    coverage = record.coverage
    under = [f"layer {u.layer} expert {u.expert} ({u.tokens})" for u in coverage.under]
    facts["made"] = {
        "format": "GGUF" if record.format == "gguf" else "legacy .dat",
        "command": shlex.join(["llama-imatrix", *record.command[1:]]),
        "calibration": {"name": record.calibration.name, "size": decimal_size(record.calibration.size),
                        "sha256": record.calibration.sha256, "shipped": record.calibration.shipped,
                        "sources": [s.model_dump() for s in record.calibration.sources]},
        "chunks": record.chunks, "ctx": record.ctx, "tokens": f"{record.tokens:,}",
        "coverage": {
            "experts": coverage.experts, "layers": len(coverage.tokens),
            "per_layer": coverage.experts // max(1, len(coverage.tokens)),
            "min": f"{coverage.min:,}", "median": f"{coverage.median:,.0f}", "max": f"{coverage.max:,}",
            "bar": coverage.min_expert_tokens, "under": len(coverage.under),
            "under_listed": ", ".join(under[:12]) + (f" and {len(under) - 12} more" if len(under) > 12 else ""),
        },
    }
    return facts


# ---------------------------------------------------------------- measured (bench record)

def _mode(name: str, n_layer: int) -> dict:
    mode = OffloadMode.from_name(name, n_layer)
    return {"label": mode.label, "flags": mode.flags}


def _machine(bench: BenchRecord, offload: bool = True) -> str:
    m = bench.machine
    parts = [f"{m.cpu} ({m.cores} cores" + (f", {binary_size(m.ram_bytes)} RAM)" if m.ram_bytes else ")")]
    parts += [g.name + (f" ({binary_size(g.memory_bytes)})" if g.memory_bytes else "") for g in m.gpus]
    devices = {run.backends for run in bench.speed} if offload else set()
    if "RPC" in devices:  # its address (an ephemeral port) is the machine's business, not the card's
        parts.append(f"offload device: {RPC_STAND_IN}")
    build = f"{bench.tool.backend.upper()} build" if bench.tool.backend != "cpu" else "CPU-only build"
    return "; ".join(parts) + f"; llama.cpp {bench.tool.commit} ({build}); {m.date[:10]}"


RPC_STAND_IN = "a ggml-rpc-server on the same machine, llama.cpp's RPC backend standing in for a GPU"


def _offload_device(bench: BenchRecord) -> str:
    """The device the offload buffers were measured on: llama.cpp's name for it and the GPU it is."""
    gpus = [g.name for g in bench.machine.gpus]
    for run in bench.memory:
        for line in run.breakdown:  # "CUDA0 (H200)": llama.cpp drops the vendor from the name
            if line.device.startswith("RPC"):
                return f"{line.device} ({RPC_STAND_IN})"
            gpu = next((g for g in gpus if g.endswith(line.description)), line.description)
            return f"{line.device} ({gpu}, {line.mib['total']:,} MiB)"
        names = [re.sub(r"\[.*\]$", "", name) for name in run.devices if not name.startswith("CPU")]
        if names:
            return ", ".join(names) + (f" ({RPC_STAND_IN})" if names[0].startswith("RPC") else "")
    return "the offload device"


def _num(value: float | None, digits: int) -> str:
    return "unknown" if value is None else f"{value:.{digits}f}"


def _pm(figures: PerplexityFigures, key: str, digits: int) -> str:
    """A figure with its uncertainty; llama.cpp prints nan where it cannot compute one (stored as None)."""
    value, err = getattr(figures, key), getattr(figures, key + "_err")
    text = _num(value, digits)
    if value is None:
        return text
    return text + (f" ± {err:.{digits}f}" if err is not None else " (uncertainty not computed by llama.cpp)")


def _ratio(figures: PerplexityFigures, base: PerplexityFigures) -> str:
    """The file's perplexity over F16's, both as the card shows them (llama-perplexity's own PPL(Q)/PPL(base)
    divides by a PPL(base) recomputed from the saved logits, clamped, which is not the F16 figure shown)."""
    if figures.ppl_q is None or not base.ppl:
        return "unknown"
    return f"{figures.ppl_q / base.ppl:.4f}"


def _figures(figures: PerplexityFigures, base: PerplexityFigures) -> dict:
    return {"ppl": _pm(figures, "ppl_q", 4), "ppl_ratio": _ratio(figures, base),
            "kld_mean": _pm(figures, "kld_mean", 6), "kld_p99": _num(figures.kld_p99, 6),
            "kld_max": _num(figures.kld_max, 6), "same_top_p": _pm(figures, "same_top_p", 2) + " %"}


def _imatrix_choice(choice: ChoiceRecord | None) -> dict | None:
    """The candidates the choice stage measured besides the published file (made, measured, never published), and
    how the published one compares with them."""
    if choice is None:
        return None
    published, stock = choice.published, choice.candidates[0]
    others = [{"name": c.name, "size": decimal_size(c.file.size), "speed": _speed(c.speed),
               **_figures(c.quality, choice.base)} for c in choice.others()]
    verdicts = {compare(published.quality, c.quality) for c in choice.others() if c.name != Made.SEARCHED}
    searched = next((c for c in choice.candidates if c.name == Made.SEARCHED), None)
    return {"published": published.name, "size": decimal_size(published.file.size), "speed": _speed(published.speed),
            "timed": any(c.speed for c in choice.candidates), "stock": choice.chosen == 0,
            "stock_name": stock.name, "stock_size": decimal_size(stock.file.size), "may_choose": choice.may_choose,
            "others": others, "verdict": verdicts.pop() if len(verdicts) == 1 else None,
            "imatrix_worse": published.name == Made.WITHOUT and choice.chosen != 0,
            "imatrix_compared": {Made.WITH, Made.WITHOUT} <= {c.name for c in choice.candidates},
            "candidates": ", ".join(c.name for c in choice.candidates[:-1]) + " and " + choice.candidates[-1].name,
            "searched": None if searched is None else {
                "published": searched is published, "larger": searched.file.size > stock.file.size,
                "verdict": compare(searched.quality, stock.quality)}}


def _speed(run: SpeedRun | None) -> str:
    if run is None:
        return "not measured"
    return "; ".join(f"{t.test} {t.avg_ts:,.0f} ± {t.stddev_ts:,.0f}" for t in run.tests)


def _slower(run: SpeedRun, than: SpeedRun) -> list[str]:
    """The tests `run` is slower in than `than` by more than twice their combined standard deviation."""
    base = {t.test: t for t in than.tests}
    return [t.test for t in run.tests if t.test in base and base[t.test].avg_ts - t.avg_ts
            > 2 * math.hypot(t.stddev_ts, base[t.test].stddev_ts)]


def _recipe(manifest: Manifest, entry: QuantEntry) -> dict | None:
    """The searched recipe: what it changed from the stock file (each group's type, bytes and measured effect on the
    selection text), its file and rebuild command, predicted against measured, and what the search cost."""
    record = entry.records.recipe
    if record is None:
        return None
    stock_eval, chosen = record.evals[0], record.evals[record.chosen]
    by_group = {tensor: g.name for g in record.groups for tensor in g.tensors}
    single = {e.label: e for e in record.evals}
    rows = {}
    for tensor, ggml_type in chosen.changes.items():
        group = by_group.get(tensor, tensor)
        row = rows.setdefault(group, {"group": group, "from": record.stock_types[tensor], "to": ggml_type})
        word = "up" if record.types.index(ggml_type) > record.types.index(record.stock_types[tensor]) else "down"
        alone = single.get(f"{group} {word}")
        row["bytes"] = f"{(alone.tensor_bytes - stock_eval.tensor_bytes) if alone else 0:+,}"
        measured = alone and alone.quality.kld_mean is not None and stock_eval.quality.kld_mean is not None
        row["kld"] = (f"{alone.quality.kld_mean - stock_eval.quality.kld_mean:+.6f}" if measured
                      else "not measured alone")
    choice = entry.records.choice
    stock, searched = choice.candidates[0], next(c for c in choice.candidates if c.name == Made.SEARCHED)
    speed = None
    if stock.speed is not None and searched.speed is not None:
        speed = {"stock": _speed(stock.speed), "recipe": _speed(searched.speed),
                 "slower": ", ".join(_slower(searched.speed, stock.speed)), "stock_name": stock.name}
    return {
        "published": entry.searched,
        "speed": speed,
        "command": shlex.join(record.command), "budget": record.budget, "budget_bytes": f"{record.budget_bytes:,}",
        "rows": sorted(rows.values(), key=lambda r: r["group"]),
        "selection": {"text": record.selection.text, "ctx": record.selection.ctx, "chunks": record.selection.chunks},
        "stock_kld": _pm(stock_eval.quality, "kld_mean", 6), "measured_kld": _pm(chosen.quality, "kld_mean", 6),
        "predicted_kld": (_num(record.predicted_kld, 6) if record.predicted_kld is not None
                          else "none: nothing changed" if chosen.label == "stock"
                          else f"none: measured as a single-group change ({chosen.label})"),
        "stock_bytes": f"{stock_eval.tensor_bytes:,}", "bytes": f"{chosen.tensor_bytes:,}",
        "gpu": None if record.gpu_budget_bytes is None else {
            "room": f"{record.gpu_budget_bytes:,}", "stock": f"{stock_eval.gpu_bytes:,}",
            "recipe": f"{chosen.gpu_bytes:,}"},
        "evals": len(record.evals), "runs": record.runs, "seconds": f"{record.seconds:,.0f}",
        "types": ", ".join(record.types),
    }


def _bench(bench: BenchRecord | None, n_layer: int, choice: ChoiceRecord | None) -> dict:
    """speed, measured_memory and quality: None each where the bench record has no such figures."""
    if not bench:
        return {"speed": None, "measured_memory": None, "quality": None, "bench_errors": [], "bench_not_measured": []}
    machine = _machine(bench)
    speed = None
    if bench.speed:
        speed = {"machine": machine, "rows": [
            {**_mode(run.mode, n_layer), "test": t.test, "tokens_per_s": f"{t.avg_ts:.2f} ± {t.stddev_ts:.2f}"}
            for run in bench.speed for t in run.tests],
            "repetitions": bench.options.repetitions, "backends": sorted({r.backends for r in bench.speed})}
    memory = None
    if bench.memory:
        memory = {"machine": _machine(bench, offload=False), "device": _offload_device(bench), "rows": [
            {**_mode(m.mode, n_layer), "ctx": m.ctx, "model": f"{m.device_mib['model']:.2f} MiB",
             "kv": f"{m.device_mib['KV']:.2f} MiB", "compute": f"{m.device_mib['compute']:.2f} MiB",
             "planned_model": f"{m.planned_mib['model']:.2f} MiB",
             "difference": f"{m.difference_mib['model']:+.2f} MiB"} for m in bench.memory]}
    quality = None
    if bench.quality:
        q, base = bench.quality.quant, bench.quality.base
        quality = {
            "machine": _machine(bench, offload=False), "text": bench.quality.text, "ctx": bench.quality.ctx,
            "chunks": bench.quality.chunks, "ppl_f16": _pm(base, "ppl", 4), **_figures(q, base),
            "choice": _imatrix_choice(choice),
        }
    errors = [{"mode": e.mode, "error": e.error} for e in bench.errors]
    not_measured = [{**_mode(m.mode, n_layer), "reason": m.reason} for m in bench.not_measured]
    return {"speed": speed, "measured_memory": memory, "quality": quality, "bench_errors": errors,
            "bench_not_measured": not_measured}

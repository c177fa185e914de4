"""The facts of partials/choose.md.j2 ("Which file should I choose?") and the context every snippet assumes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from moeq.cards.facts.shared import gpu_label, noisy, pm_text
from moeq.cards.render import code
from moeq.manifest import QuantEntry
from moeq.offload import OffloadMode
from moeq.records import BenchRecord
from moeq.units import binary_size, decimal_size


@dataclass(frozen=True)
class ChoiceRow:
    """One quant's line in "Which file should I choose?" for a GPU size."""
    quant: str
    size: str
    kld: str
    key: int | str | None  # what makes two GPU sizes' rows the same choice
    placement: str
    gpu: str = ""
    ram: str = ""
    speed: str = ""
    download: int = 0  # bytes of all its files
    tokens_s: str | None = None  # its generation speed as a figure to quote: measured on a GPU, and not noisy


@dataclass(frozen=True)
class GpuGroup:
    gpu: str
    rows: list[ChoiceRow]


@dataclass(frozen=True)
class Pick:
    """The card's first answer for one GPU size: the largest file that fits, and how."""
    gpu: str
    quant: str | None  # None: no file fits
    placement: str
    download: str
    tokens_s: str | None


@dataclass(frozen=True)
class ChooseFacts:
    ctx: int
    kv_type: str
    allowance: str
    groups: list[GpuGroup]
    picks: list[Pick]


@dataclass(frozen=True)
class ContextFacts:
    ctx: int
    kv: str
    kv_type: str
    per_1024: str
    trained: int | None
    kv_trained: str | None


def choose_facts(entries: list[QuantEntry]) -> ChooseFacts | None:
    """"Which file should I choose?": for each GPU size of the plans, each quant's smallest expert offload that fits
    at the first configured context, with the system RAM its weights then need, and the generation speed and KLD
    where the bench measured them. GPU sizes where every quant's choice is the same share a row group."""
    plans = memory_plans(entries)
    if not plans:
        return None
    ctx = plans[0].fits[0].ctx
    sizes = sorted({f.gpu_gib for plan in plans for f in plan.fits})
    groups: list[tuple[list[int], list[ChoiceRow]]] = []
    for gib in sizes:
        rows = [choice_row(entry, gib, ctx) for entry in entries]
        if groups and [r.key for r in groups[-1][1]] == [r.key for r in rows]:
            groups[-1][0].append(gib)
        else:
            groups.append(([gib], rows))
    labelled = [GpuGroup(gpu_label(gibs, gibs[-1] == sizes[-1]), rows) for gibs, rows in groups]
    return ChooseFacts(ctx=ctx, kv_type=plans[0].kv_type, allowance=binary_size(plans[0].compute_allowance_bytes),
                       groups=labelled, picks=[pick(group) for group in labelled])


def pick(group: GpuGroup) -> Pick:
    """The largest file whose row fits the group's GPU size (the rule the table states)."""
    fitting = [row for row in group.rows if row.gpu]
    if not fitting:
        return Pick(group.gpu, None, "", "", None)
    best = max(fitting, key=lambda row: row.download)
    return Pick(group.gpu, best.quant, best.placement, best.size, best.tokens_s)


def memory_plans(entries: list[QuantEntry]) -> list:
    """The memory plans of the quants that have one (a validation record), in ladder order; the first plan's first
    context is the one the card's figures and snippets assume."""
    return [e.records.validate_.plan for e in entries if e.records.validate_ is not None]


def choice_row(entry: QuantEntry, gib: int, ctx: int) -> ChoiceRow:
    quality = entry.records.bench.quality if entry.records.bench else None
    kld = pm_text(quality.quant, "kld_mean", 6) if quality else "not measured"
    download = sum(f.size for f in entry.files)
    row = ChoiceRow(quant=entry.quant, size=decimal_size(download), kld=kld, key=None, placement="does not fit",
                    download=download)
    plan = entry.records.validate_.plan if entry.records.validate_ else None
    if plan is None:
        return replace(row, key="no plan", placement="not computed (no validation record)")
    fit = next((f for f in plan.fits if f.gpu_gib == gib and f.ctx == ctx), None)
    if fit is None or fit.n_cpu_moe is None:
        return row
    mode = OffloadMode.for_layers(fit.n_cpu_moe, plan.n_layer)
    speed, tokens_s = generation_speed(entry.records.bench, mode.name)
    return replace(row, key=fit.n_cpu_moe, placement=mode.advice if mode.name == "gpu" else code(mode.advice),
                   gpu=binary_size(fit.gpu_bytes), ram=binary_size(plan.placement(fit.n_cpu_moe).cpu_bytes),
                   speed=speed, tokens_s=tokens_s)


def generation_speed(bench: BenchRecord | None, mode: str) -> tuple[str, str | None]:
    """Tokens per second generating (llama-bench's tg test) in `mode`, as the table shows it and as a figure to
    quote (None: not measured, noisy, or measured with a CPU standing in for the GPU, which says nothing of a
    GPU's speed)."""
    for run in bench.speed if bench else []:
        if run.mode == mode:
            for test in run.tests:
                if test.test.startswith("tg"):
                    if bench.options.rpc and mode != "cpu":
                        return "not measured on a GPU (a CPU stood in for it)", None
                    if noisy(test):
                        return "too noisy to quote", None
                    return f"{test.avg_ts:.2f} ± {test.stddev_ts:.2f}", f"{test.avg_ts:.2f}"
    return "not measured", None


def context_facts(entries: list[QuantEntry], trained: int | None) -> ContextFacts | None:
    """The context every usage snippet passes (-c), the one the memory figures assume, and how the KV cache
    grows with it (linearly: the same bytes per token at every context)."""
    plans = memory_plans(entries)
    if not plans:
        return None
    ctx = plans[0].fits[0].ctx
    per_token = plans[0].kv_bytes[ctx] / ctx
    return ContextFacts(ctx=ctx, kv=binary_size(plans[0].kv_bytes[ctx]), kv_type=plans[0].kv_type,
                        per_1024=binary_size(per_token * 1024),
                        trained=trained, kv_trained=binary_size(per_token * trained) if trained else None)

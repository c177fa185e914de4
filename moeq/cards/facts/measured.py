"""The facts of partials/measured.md.j2: speed, measured buffers and quality from the bench record, and the choice."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moeq.cards.facts.shared import noisy, Figures, Mode, figure_texts, mode_facts, pm_text, speed_text
from moeq.kld import compare
from moeq.records import Made, BenchRecord, ChoiceRecord
from moeq.units import binary_size, decimal_size


RPC_STAND_IN = "a ggml-rpc-server on the same machine, llama.cpp's RPC backend standing in for a GPU"


def machine_text(bench: BenchRecord, offload: bool = True) -> str:
    m = bench.machine
    parts = [f"{m.cpu} ({m.cores} cores" + (f", {binary_size(m.ram_bytes)} RAM)" if m.ram_bytes else ")")]
    parts += [g.name + (f" ({binary_size(g.memory_bytes)})" if g.memory_bytes else "") for g in m.gpus]
    devices = {run.backends for run in bench.speed} if offload else set()
    if "RPC" in devices:  # its address (an ephemeral port) is the machine's business, not the card's
        parts.append(f"offload device: {RPC_STAND_IN}")
    build = f"{bench.tool.backend.upper()} build" if bench.tool.backend != "cpu" else "CPU-only build"
    return "; ".join(parts) + f"; llama.cpp {bench.tool.commit} ({build}); {m.date[:10]}"


def offload_device(bench: BenchRecord) -> str:
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


@dataclass(frozen=True)
class OtherCandidate(Figures):
    """A candidate the choice measured and did not publish."""
    name: str
    size: str
    speed: str


@dataclass(frozen=True)
class SearchedVerdict:
    published: bool
    larger: bool
    verdict: str


@dataclass(frozen=True)
class ChoiceFacts:
    published: str
    size: str
    speed: str
    timed: bool
    stock: bool
    stock_name: str
    stock_size: str
    may_choose: bool
    others: list[OtherCandidate]
    verdict: str | None
    imatrix_worse: bool
    imatrix_compared: bool
    candidates: str
    searched: SearchedVerdict | None


def choice_facts(choice: ChoiceRecord | None) -> ChoiceFacts | None:
    """The candidates the choice stage measured besides the published file (made, measured, never published), and
    how the published one compares with them."""
    if choice is None:
        return None
    published, stock = choice.published, choice.candidates[0]
    others = [OtherCandidate(**vars(figure_texts(c.quality, choice.base)), name=c.name,
                             size=decimal_size(c.file.size), speed=speed_text(c.speed)) for c in choice.others()]
    verdicts = {compare(published.quality, c.quality) for c in choice.others() if c.name != Made.SEARCHED}
    searched = next((c for c in choice.candidates if c.name == Made.SEARCHED), None)
    return ChoiceFacts(
        published=published.name, size=decimal_size(published.file.size), speed=speed_text(published.speed),
        timed=any(c.speed for c in choice.candidates), stock=choice.chosen == 0,
        stock_name=stock.name, stock_size=decimal_size(stock.file.size), may_choose=choice.may_choose,
        others=others, verdict=verdicts.pop() if len(verdicts) == 1 else None,
        imatrix_worse=published.name == Made.WITHOUT and choice.chosen != 0,
        imatrix_compared={Made.WITH, Made.WITHOUT} <= {c.name for c in choice.candidates},
        candidates=", ".join(c.name for c in choice.candidates[:-1]) + " and " + choice.candidates[-1].name,
        searched=None if searched is None else SearchedVerdict(
            published=searched is published, larger=searched.file.size > stock.file.size,
            verdict=compare(searched.quality, stock.quality)))


@dataclass(frozen=True)
class SpeedRow(Mode):
    test: str
    tokens_per_s: str


@dataclass(frozen=True)
class SpeedFacts:
    machine: str
    rows: list[SpeedRow]
    repetitions: int
    backends: list[str]


@dataclass(frozen=True)
class MeasuredMemoryRow(Mode):
    ctx: int
    model: str
    kv: str
    compute: str
    planned_model: str
    difference: str


@dataclass(frozen=True)
class MeasuredMemoryFacts:
    machine: str
    device: str
    rows: list[MeasuredMemoryRow]


@dataclass(frozen=True)
class QualityFacts(Figures):
    machine: str
    text: str
    ctx: int
    chunks: int
    ppl_f16: str
    choice: ChoiceFacts | None


@dataclass(frozen=True)
class BenchError:
    mode: str
    error: str


@dataclass(frozen=True)
class NotMeasuredRow(Mode):
    reason: str


@dataclass(frozen=True)
class BenchFacts:
    """What the bench record says; each part None (or empty) where the record has no such figures."""
    speed: SpeedFacts | None = None
    measured_memory: MeasuredMemoryFacts | None = None
    quality: QualityFacts | None = None
    bench_errors: list[BenchError] = field(default_factory=list)
    bench_not_measured: list[NotMeasuredRow] = field(default_factory=list)


def bench_facts(bench: BenchRecord | None, n_layer: int, choice: ChoiceRecord | None) -> BenchFacts:
    if not bench:
        return BenchFacts()
    speed = None
    if bench.speed:
        speed = SpeedFacts(machine=machine_text(bench), rows=[
            SpeedRow(**vars(mode_facts(run.mode, n_layer)), test=t.test,
                     tokens_per_s=f"{t.avg_ts:.2f} ± {t.stddev_ts:.2f}" + (" (noisy)" if noisy(t) else ""))
            for run in bench.speed for t in run.tests],
            repetitions=bench.options.repetitions, backends=sorted({r.backends for r in bench.speed}))
    memory = None
    if bench.memory:
        memory = MeasuredMemoryFacts(machine=machine_text(bench, offload=False), device=offload_device(bench), rows=[
            MeasuredMemoryRow(**vars(mode_facts(m.mode, n_layer)), ctx=m.ctx, model=f"{m.device_mib['model']:.2f} MiB",
                              kv=f"{m.device_mib['KV']:.2f} MiB", compute=f"{m.device_mib['compute']:.2f} MiB",
                              planned_model=f"{m.planned_mib['model']:.2f} MiB",
                              difference=f"{m.difference_mib['model']:+.2f} MiB") for m in bench.memory])
    quality = None
    if bench.quality:
        q, base = bench.quality.quant, bench.quality.base
        quality = QualityFacts(**vars(figure_texts(q, base)), machine=machine_text(bench, offload=False),
                               text=bench.quality.text, ctx=bench.quality.ctx, chunks=bench.quality.chunks,
                               ppl_f16=pm_text(base, "ppl", 4), choice=choice_facts(choice))
    return BenchFacts(speed=speed, measured_memory=memory, quality=quality,
                      bench_errors=[BenchError(e.mode, e.error) for e in bench.errors],
                      bench_not_measured=[NotMeasuredRow(**vars(mode_facts(m.mode, n_layer)), reason=m.reason)
                                          for m in bench.not_measured])

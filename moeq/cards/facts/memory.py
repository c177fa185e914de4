"""The facts of partials/memory.md.j2: the memory plan, by offload mode and context."""

from __future__ import annotations

from dataclasses import dataclass

from moeq.cards.facts.shared import fit_cell
from moeq.offload import OffloadMode
from moeq.records import ValidateRecord
from moeq.units import binary_size


@dataclass(frozen=True)
class ModeRow:
    label: str
    flags: str
    gpu: str
    ram: str


@dataclass(frozen=True)
class KvRow:
    ctx: int
    size: str


@dataclass(frozen=True)
class FitRow:
    gpu: str
    cells: list[str]


@dataclass(frozen=True)
class NcmoeExample:
    n: int
    gpu: str
    ctx: int


@dataclass(frozen=True)
class MemoryFacts:
    kv_type: str
    compute_allowance: str
    modes: list[ModeRow]
    kv: list[KvRow]
    contexts: list[int]
    fits: list[FitRow]
    ncmoe_example: NcmoeExample | None
    blocks: int


def memory_facts(validated: ValidateRecord | None) -> MemoryFacts | None:
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
    return MemoryFacts(
        kv_type=plan.kv_type,
        compute_allowance=binary_size(plan.compute_allowance_bytes),
        modes=[ModeRow(m.label, m.flags, binary_size(plan.placement(m.n_cpu_moe).gpu_bytes),
                       binary_size(plan.placement(m.n_cpu_moe).cpu_bytes)) for m in modes],
        kv=[KvRow(ctx, binary_size(plan.kv_bytes[ctx])) for ctx in contexts],
        contexts=contexts,
        fits=[FitRow(f"{gib} GiB", [fit_cell(advice[(gib, ctx)], n_layer) for ctx in contexts]) for gib in gpu_sizes],
        ncmoe_example=NcmoeExample(example.n_cpu_moe, f"{example.gpu_gib} GiB", example.ctx) if example else None,
        blocks=n_layer,
    )

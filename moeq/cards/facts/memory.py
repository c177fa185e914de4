"""The facts of partials/memory.md.j2: the memory plan, by offload mode and context."""

from __future__ import annotations

from moeq.cards.facts.shared import fit_cell
from moeq.offload import OffloadMode
from moeq.records import ValidateRecord
from moeq.units import binary_size


def memory_facts(validated: ValidateRecord | None) -> dict | None:
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
                  "cells": [fit_cell(advice[(gib, ctx)], n_layer) for ctx in contexts]} for gib in gpu_sizes],
        "ncmoe_example": {"n": example.n_cpu_moe, "gpu": f"{example.gpu_gib} GiB", "ctx": example.ctx}
        if example else None,
        "blocks": n_layer,
    }

"""The facts of partials/validation.md.j2: the checks and the worst tensor per type."""

from __future__ import annotations

from moeq.records import ValidateRecord, WorstTensor


def validation_facts(validated: ValidateRecord | None) -> dict | None:
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

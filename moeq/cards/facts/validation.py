"""The facts of partials/validation.md.j2: the checks and the worst tensor per type."""

from __future__ import annotations

from dataclasses import dataclass

from moeq.records import ValidateRecord, WorstTensor


@dataclass(frozen=True)
class CheckRow:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class WorstRow:
    type: str
    tensor: str
    rel_rmse: str
    bound: str


@dataclass(frozen=True)
class ValidationFacts:
    numerics: str
    checks: list[CheckRow]
    worst: list[WorstRow]


def validation_facts(validated: ValidateRecord | None) -> ValidationFacts | None:
    if not validated:
        return None
    worst_by_type: dict[str, WorstTensor] = {}
    for row in validated.worst_tensors:
        kept = worst_by_type.get(row.type)
        if kept is None or row.rel_rmse > kept.rel_rmse:
            worst_by_type[row.type] = row
    return ValidationFacts(
        numerics=validated.numerics,
        checks=[CheckRow(c.name, c.ok, c.detail) for c in validated.checks],
        worst=[WorstRow(t, r.name, f"{r.rel_rmse:.4f}", f"{r.bound:.3f}" if r.bound is not None else "none")
               for t, r in sorted(worst_by_type.items())],
    )

"""The facts of partials/imatrix.md.j2: the importance matrix, how it was made, expert coverage."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from moeq.cards.facts.shared import hub_url
from moeq.manifest import Manifest, QuantEntry
from moeq.units import decimal_size


@dataclass(frozen=True)
class Calibration:
    name: str
    size: str
    sha256: str
    shipped: bool
    sources: list[dict]  # each `title`, `url`, `license`, as the record holds them


@dataclass(frozen=True)
class Coverage:
    experts: int
    layers: int
    per_layer: int
    min: str
    median: str
    max: str
    bar: int
    under: int
    under_listed: str


@dataclass(frozen=True)
class MadeImatrix:
    format: str
    command: str
    calibration: Calibration
    chunks: int
    ctx: int
    tokens: str
    coverage: Coverage


@dataclass(frozen=True)
class ImatrixFacts:
    file: str
    size: str
    sha256: str
    url: str
    made: MadeImatrix | None  # None for a file given by path


def imatrix_facts(manifest: Manifest, entry: QuantEntry) -> ImatrixFacts | None:
    """The importance matrix the file was made with: published beside it; how it was made when moeq made it."""
    published = entry.imatrix_file
    if published is None:
        return None
    record = entry.records.imatrix
    return ImatrixFacts(file=published.name, size=decimal_size(published.size), sha256=published.sha256,
                        url=f"{hub_url(manifest.repo_id)}/resolve/main/{published.name}",
                        made=None if record is None else _made(record))


def _made(record) -> MadeImatrix:
    coverage = record.coverage
    under = [f"layer {u.layer} expert {u.expert} ({u.tokens})" for u in coverage.under]
    return MadeImatrix(
        format="GGUF" if record.format == "gguf" else "legacy .dat",
        command=shlex.join(["llama-imatrix", *record.command[1:]]),
        calibration=Calibration(name=record.calibration.name, size=decimal_size(record.calibration.size),
                                sha256=record.calibration.sha256, shipped=record.calibration.shipped,
                                sources=[s.model_dump() for s in record.calibration.sources]),
        chunks=record.chunks, ctx=record.ctx, tokens=f"{record.tokens:,}",
        coverage=Coverage(
            experts=coverage.experts, layers=len(coverage.tokens),
            per_layer=coverage.experts // max(1, len(coverage.tokens)),
            min=f"{coverage.min:,}", median=f"{coverage.median:,.0f}", max=f"{coverage.max:,}",
            bar=coverage.min_expert_tokens, under=len(coverage.under),
            under_listed=", ".join(under[:12]) + (f" and {len(under) - 12} more" if len(under) > 12 else "")),
    )

"""The facts of partials/imatrix.md.j2: the importance matrix, how it was made, expert coverage."""

from __future__ import annotations

import shlex

from moeq.cards.facts.shared import hub_url
from moeq.manifest import Manifest, QuantEntry
from moeq.units import decimal_size


def imatrix_facts(manifest: Manifest, entry: QuantEntry) -> dict | None:
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

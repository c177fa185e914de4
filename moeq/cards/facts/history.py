"""The facts of the card's "Updates" section and of the superseded rows of its files table, from the manifest's
update notes and superseded files (what each release changed, from the manifest on the Hub before it)."""

from __future__ import annotations

from dataclasses import dataclass

from moeq.cards.facts.shared import hub_url
from moeq.manifest import Manifest
from moeq.units import decimal_size


@dataclass(frozen=True)
class SupersededRow:
    name: str
    url: str
    size: str
    sha256: str
    label: str
    replaced_by: str


@dataclass(frozen=True)
class UpdateFacts:
    since: str  # the commit's first 12 characters
    since_url: str
    lines: list[str]


def superseded_rows(manifest: Manifest) -> list[SupersededRow]:
    base = hub_url(manifest.repo_id)
    return [SupersededRow(s.name, f"{base}/resolve/main/{s.name}", decimal_size(s.size), s.sha256, s.label,
                          s.replaced_by) for s in manifest.superseded]


def update_facts(manifest: Manifest) -> list[UpdateFacts]:
    """Newest first, as the card lists them."""
    base = hub_url(manifest.repo_id)
    return [UpdateFacts(note.since[:12], f"{base}/commit/{note.since}", note.lines())
            for note in reversed(manifest.updates)]

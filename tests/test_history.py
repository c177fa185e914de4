"""A repo's history from the manifest on the Hub before a release (moeq/cards/history.py): the files a release
supersedes stay listed while they are on the Hub, the update note says what changed, and the card shows both."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moeq.cards.facts import card_facts
from moeq.cards.history import PublishedRepo, with_history
from moeq.cards.lint import lint_card
from moeq.cards.render import render_card
from moeq.manifest import MANIFEST_NAME, Replacement, UpdateNote, read_manifest

OLD, NEW = "tiny-phimoe-Q2_K.gguf", "tiny-phimoe-Q2_K-v2.gguf"


def renamed(manifest):
    """The manifest of a release that publishes Q2_K under another name, with other bytes."""
    new = manifest.model_copy(deep=True)
    entry = new.entry("Q2_K")
    entry.files = [entry.files[0].model_copy(update={"name": NEW, "sha256": "b" * 64, "size": 1_234})]
    new.repo_files = sorted(set(new.repo_files) - {OLD} | {NEW})
    return new


def test_a_release_keeps_what_it_supersedes_and_notes_what_changed(carded_ladder):
    _pipeline, ws, _ = carded_ladder
    old = read_manifest(ws.repo_dir(None) / MANIFEST_NAME)
    first = PublishedRepo("a" * 40, old, frozenset(old.repo_files))
    got = with_history(renamed(old), first, prune=False)
    assert [(s.name, s.label, s.replaced_by) for s in got.superseded] == [(OLD, "Q2_K", "Q2_K")]
    [note] = got.updates
    assert note.since == "a" * 40 and note.replaced == [Replacement(quant="Q2_K", old=OLD, new=NEW, kept=True)]
    size = sum(f.size for f in old.entry("Q2_K").files)
    assert f"Q2_K size: {size:,} bytes -> 1,234 bytes" in note.lines() and not note.added and not note.removed
    text = render_card(card_facts(got))
    assert f"| [{OLD}](https://huggingface.co/{old.repo_id}/resolve/main/{OLD}) | Q2_K, **superseded** by Q2_K" in text
    assert f"- Since [{'a' * 12}](https://huggingface.co/{old.repo_id}/commit/{'a' * 40}):" in text
    assert lint_card(text, "README.md", got) == []

    # with --prune nothing is kept, and the note says the old file goes
    pruned = with_history(renamed(old), first, prune=True)
    assert pruned.superseded == [] and pruned.updates[0].replaced[0].kept is False

    # the next release, nothing changed: the same superseded file, the same notes, no new one
    second = PublishedRepo("c" * 40, got, frozenset([*got.repo_files, OLD]))
    again = with_history(renamed(old), second, prune=False)
    assert again.superseded == got.superseded and again.updates == got.updates
    # ... then pruned: the note says so, the earlier one stays
    later = with_history(renamed(old), second, prune=True)
    assert later.superseded == [] and later.updates[0] == note and later.updates[1].pruned == [OLD]
    # a superseded file someone deleted on the Hub is not listed as kept
    assert with_history(renamed(old), PublishedRepo("c" * 40, got, frozenset(got.repo_files)), False).superseded == []


def test_a_note_from_the_hub_names_a_commit_and_nothing_else():
    with pytest.raises(ValidationError):
        UpdateNote(since="javascript:alert(1)")
    assert UpdateNote(since="0" * 40).lines() == []

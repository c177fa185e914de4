"""A release's place in its repo's history, from the manifest on the Hub before it: which GGUFs of an earlier release
it supersedes (kept under their old names, so `-hf REPO:Q2_K` keeps working, until `push --prune`), and what it
changed (the card's "Updates" and the commit message).

    published = PublishedRepo(head="3f2a...", manifest=parse_manifest(text, where), paths=frozenset(listing))
    manifest = with_history(new_manifest, published, prune=False)
    manifest.superseded, manifest.updates[-1].lines()
"""

from __future__ import annotations

from dataclasses import dataclass

from moeq.manifest import (MAX_UPDATES, FigureChange, Manifest, QuantEntry, Replacement, SupersededFile,
                           UpdateNote)


@dataclass(frozen=True)
class PublishedRepo:
    """What main on the Hub holds: its commit, the manifest there (None: none this moeq reads), every path."""

    head: str
    manifest: Manifest | None
    paths: frozenset[str]


def with_history(manifest: Manifest, published: PublishedRepo | None, prune: bool) -> Manifest:
    """`manifest` with what it supersedes on the Hub and the repo's update notes, this release's included."""
    kept = superseded_files(published, manifest.quants, set(manifest.repo_files), prune)
    manifest = manifest.model_copy(update={"superseded": kept})
    return manifest.model_copy(update={"updates": updates(published, manifest)})


def superseded_files(published: PublishedRepo | None, quants: list[QuantEntry], taken: set[str],
                     prune: bool) -> list[SupersededFile]:
    """The GGUFs moeq published before for a quant this release still holds, under a name it no longer uses, that
    are still on the Hub: kept and listed as superseded (none with `prune`, which deletes them)."""
    if published is None or published.manifest is None or prune:
        return []
    now = {q.quant: q for q in quants}
    before = [(q.quant, q.label, f.name, f.size, f.sha256) for q in published.manifest.quants for f in q.files]
    before += [(s.quant, s.label, s.name, s.size, s.sha256) for s in published.manifest.superseded]
    kept: dict[str, SupersededFile] = {}
    for quant, label, name, size, sha256 in before:
        if quant in now and name not in taken and name in published.paths and name.endswith(".gguf"):
            kept[name] = SupersededFile(name=name, size=size, sha256=sha256, quant=quant, label=label,
                                        replaced_by=now[quant].label)
    return sorted(kept.values(), key=lambda s: s.name)


def updates(published: PublishedRepo | None, manifest: Manifest) -> list[UpdateNote]:
    """The repo's update notes after this release: those the Hub's manifest carries, and this release's own when it
    changed anything (the newest MAX_UPDATES)."""
    if published is None or published.manifest is None:
        return []
    notes = list(published.manifest.updates)
    note = update_note(published, manifest)
    if note is not None:
        notes.append(note)
    return notes[-MAX_UPDATES:]


def update_note(published: PublishedRepo, manifest: Manifest) -> UpdateNote | None:
    """What `manifest` changes against the manifest on the Hub: files added, replaced, remade and removed, the
    llama.cpp commit, and each quant's size, mean KLD and PPL where both measured them; None when nothing."""
    old = published.manifest
    if old is None:
        return None
    before, after = {q.quant: q for q in old.quants}, {q.quant: q for q in manifest.quants}
    kept = {s.name for s in manifest.superseded}
    note = UpdateNote(since=published.head)
    old_tool, new_tool = _tool(old), _tool(manifest)
    if old_tool and new_tool and old_tool != new_tool:
        note.llama_cpp = [old_tool, new_tool]
    for quant, entry in after.items():
        was = before.get(quant)
        if was is None:
            note.added.append(entry.files[0].name)
        elif was.files[0].name != entry.files[0].name:
            note.replaced.append(Replacement(quant=quant, old=was.files[0].name, new=entry.files[0].name,
                                             kept=was.files[0].name in kept))
        elif [f.sha256 for f in was.files] != [f.sha256 for f in entry.files]:
            note.remade.append(entry.files[0].name)
        if was is not None:
            note.figures += _changed_figures(quant, was, entry)
    note.removed = [q.files[0].name for name, q in before.items() if name not in after]
    note.pruned = [s.name for s in old.superseded if s.name not in kept and s.name in published.paths]
    changed = note.model_dump(exclude={"since"})
    return note if any(changed.values()) else None


def _tool(manifest: Manifest) -> str | None:
    return manifest.quants[0].records.quantize.tool.commit if manifest.quants else None


def _changed_figures(quant: str, was: QuantEntry, now: QuantEntry) -> list[FigureChange]:
    pairs = [("size", sum(f.size for f in was.files), sum(f.size for f in now.files))]
    old_q, new_q = _quality(was), _quality(now)
    if old_q is not None and new_q is not None:
        pairs += [("mean KLD", old_q.kld_mean, new_q.kld_mean), ("PPL", old_q.ppl_q, new_q.ppl_q)]
    return [FigureChange(quant=quant, figure=figure, before=b, after=a) for figure, b, a in pairs
            if b is not None and a is not None and b != a]


def _quality(entry: QuantEntry):
    bench = entry.records.bench
    return bench.quality.quant if bench is not None and bench.quality is not None else None


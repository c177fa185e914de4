"""The card stage: records -> manifest -> facts -> README.md, linted, in a staged repo folder.

The staged folder (WORKSPACE/repos/<quant>/, or WORKSPACE/repos/ladder/ for the one repo of hub.layout
single) holds exactly what the Hub repo will hold: the card, the GGUF files the shards records name
(hard links, so no copy), the importance matrix they were made with, the charts (images/, drawn from the
manifest) and the records manifest. A card that fails lint is never written. Its key is the manifest's
sha256 and the templates' sha256.

    inputs = RepoInputs(repo_id, Layout.PER_QUANT, source, [CardInputs.from_records(records, quant, shards)])
    result = run_stage(card_stage(pipeline, "Q8_0", ws, inputs), records)
    Path(result.record.folder) == ws.repo_dir("Q8_0")
    # -> True
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from moeq.cards.charts import charts, draw
from moeq.cards.facts import card_facts
from moeq.cards.lint import lint_card
from moeq.cards.manifest import RepoInputs, build_manifest, repo_paths
from moeq.cards.render import DEFAULT_TEMPLATE, render_card, templates_sha256
from moeq.config import Pipeline
from moeq.errors import CheckFailed, InputError
from moeq.manifest import MANIFEST_NAME, README_NAME, Manifest, manifest_text
from moeq.records import CardRecord, FileRef
from moeq.stage_runner import Stage
from moeq.workspace import Workspace, partial_file, write_bytes_atomic, write_text_atomic

MEASURED_SECTIONS = {"memory": "memory plan (validate)", "validation": "checks (validate)",
                     "speed": "speed (bench)", "measured_memory": "measured VRAM (bench)",
                     "quality": "quality (bench)"}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def card_stage(pipeline: Pipeline, quant: str | None, ws: Workspace, inputs: RepoInputs) -> Stage[CardRecord]:
    """Render, lint and stage the card of one repo: `quant` is its quant (per-quant layout) or None (the one repo)."""
    manifest = build_manifest(pipeline, inputs, ws)
    gguf_files = [(path, ref) for quant in inputs.quants for path, ref in zip(repo_paths(pipeline, quant),
                                                                                 quant.shards.files)]
    imatrices = {Path(q.imatrix_file.path).name: q.imatrix_file for q in inputs.quants if q.imatrix_file}
    recipes = [(Path(q.recipe_file.path).name, q.recipe_file) for q in inputs.quants if q.recipe_file]
    licenses = [(manifest.license_file.name, inputs.source.license)] if manifest.license_file else []
    published = [*gguf_files, *imatrices.items(), *recipes, *licenses]
    return _staged_card(pipeline, quant, ws, manifest, published, copied={*imatrices, *dict(recipes)})


def branch_card_stage(pipeline: Pipeline, ws: Workspace, manifest: Manifest, branch: str,
                      commit: str) -> Stage[CardRecord]:
    """The ladder's card from the manifest moeq publish merged from a staging branch: the card, the manifest and
    the charts are staged here; every other file of the repo stays on the branch (at `commit`), where the push
    copies it from."""
    return _staged_card(pipeline, None, ws, manifest, [], from_branch=(branch, commit))


def _staged_card(pipeline: Pipeline, quant: str | None, ws: Workspace, manifest: Manifest,
                 published: list[tuple[str, FileRef]], copied: set[str] = frozenset(),
                 from_branch: tuple[str, str] | None = None) -> Stage[CardRecord]:
    manifest_body = manifest_text(manifest)
    template = pipeline.card.template or DEFAULT_TEMPLATE
    folder = ws.repo_dir(quant)
    what = quant or "the ladder"

    def stage_key() -> dict:
        key = {"manifest_sha256": _sha(manifest_body), "templates_sha256": templates_sha256(template)}
        return {**key, "from_branch": list(from_branch)} if from_branch else key

    def run() -> CardRecord:
        facts = card_facts(manifest)
        text = render_card(facts, template)
        findings = lint_card(text, README_NAME, manifest, template, facts)
        if findings:
            shown = "; ".join(f.format(README_NAME) for f in findings[:3])
            more = f" (+{len(findings) - 3} more)" if len(findings) > 3 else ""
            raise CheckFailed(template, f"the card it renders for {what} fails lint, so it was not written: {shown}{more}",
                              "fix the template")
        folder.mkdir(parents=True, exist_ok=True)
        for path, ref in published:
            _link_artifact(Path(ref.path), folder / path, ws, copy_outside=path in copied)
        for chart in charts(manifest):
            write_bytes_atomic(folder / chart.path, draw(manifest, chart))
        write_text_atomic(folder / MANIFEST_NAME, manifest_body)
        write_text_atomic(folder / README_NAME, text)
        _remove_strays(folder, set(manifest.repo_files))
        branch, commit = from_branch or (None, None)
        return CardRecord(
            quant=quant, quants=[q.quant for q in manifest.quants], repo_id=manifest.repo_id, folder=str(folder),
            readme=FileRef(path=str(folder / README_NAME), size=len(text.encode()), sha256=_sha(text)),
            manifest=FileRef(path=str(folder / MANIFEST_NAME), size=len(manifest_body.encode()),
                             sha256=_sha(manifest_body)),
            repo_files=list(manifest.repo_files), template=str(template),
            templates_sha256=stage_key()["templates_sha256"],
            not_measured=[f"{q.type}: {label}" if len(manifest.quants) > 1 else label
                          for q in facts.quants for k, label in MEASURED_SECTIONS.items() if getattr(q, k) is None],
            from_branch=branch, from_commit=commit,
        )

    return Stage("card", quant, key=stage_key, run=run, intact=lambda r: _staged_intact(r, published, ws),
                 lock=f"repo-{quant or 'ladder'}")


def staged_paths(folder: Path) -> list[str]:
    """Every file under a staged repo folder, as repo paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _remove_strays(folder: Path, keep: set[str]) -> None:
    for path in staged_paths(folder):
        if path not in keep:
            (folder / path).unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(sub.iterdir()):
            sub.rmdir()


def _staged_intact(record: CardRecord, published: list[tuple[str, FileRef]], ws: Workspace) -> bool:
    folder = Path(record.folder)
    if not folder.is_dir():
        return False
    here = staged_paths(folder)
    if record.from_branch is None and here != sorted(record.repo_files) or not set(here) <= set(record.repo_files):
        return False
    readme = folder / README_NAME
    return (all(_staged(folder / path, ref, ws) for path, ref in published)
            and _sha(readme.read_text(encoding="utf-8")) == record.readme.sha256)


def _staged(staged: Path, ref: FileRef, ws: Workspace) -> bool:
    """The staged file is the artifact itself (a link: a stale link would keep an old file's blocks alive), or,
    for an importance matrix from outside the workspace, a copy of it."""
    if not staged.exists():
        return False
    if _in_workspace(Path(ref.path), ws):
        return os.path.exists(ref.path) and os.path.samefile(staged, ref.path)
    return staged.stat().st_size == ref.size and ws.hashes.sha256(staged) == ref.sha256


def _in_workspace(path: Path, ws: Workspace) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(ws.root))


def _link_artifact(artifact: Path, staged: Path, ws: Workspace, copy_outside: bool = False) -> None:
    """Hard-link a file into the staged repo (a symlink across filesystems); never a partial file.

    Only a GGUF file of this workspace is staged: a copied workspace never publishes the original's file.
    An importance matrix or a recipe file given by path (`copy_outside`) may live anywhere; it is small, and copied."""
    inside = _in_workspace(artifact, ws)
    if not inside and not copy_outside:
        raise InputError(artifact, f"not in the workspace {ws.root}, so it is not staged",
                         "run moeq quantize --force for this quant")
    if staged.exists() and os.path.samefile(staged, artifact):
        return
    staged.parent.mkdir(parents=True, exist_ok=True)
    if not inside:
        with partial_file(staged) as partial:
            shutil.copyfile(artifact, partial)
        return
    with partial_file(staged, synced=True) as partial:  # a link to a file already whole on disk
        try:
            os.link(artifact, partial)
        except OSError:
            os.symlink(artifact.resolve(), partial)

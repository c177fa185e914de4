"""The card stage: records -> manifest -> facts -> README.md, linted, in a staged repo folder.

The staged folder (WORKSPACE/repos/<quant>/) holds exactly what the Hub repo will hold: the card, the
GGUF files the shards record names (hard links, so no copy) and the records manifest. A card that fails
lint is never written. Its key is the manifest's sha256 and the templates' sha256.

    inputs = CardInputs.from_records(records, pipeline, quant, shards)
    result = run_stage(card_stage(pipeline, quant, ws, inputs), records)
    Path(result.record.folder) == ws.repo_dir(quant.type)
    # -> True
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from moeq.cards.facts import card_facts
from moeq.cards.lint import lint_card
from moeq.cards.manifest import CardInputs, build_manifest
from moeq.cards.render import DEFAULT_TEMPLATE, render_card, templates_sha256
from moeq.config import Pipeline, QuantSpec
from moeq.errors import CheckFailed, InputError
from moeq.manifest import MANIFEST_NAME, README_NAME, manifest_text
from moeq.records import CardRecord, FileRef
from moeq.stage_runner import Stage
from moeq.workspace import Workspace, commit_file, partial_path, write_text_atomic

MEASURED_SECTIONS = {"memory": "memory plan (validate)", "validation": "checks (validate)",
                     "speed": "speed (bench)", "measured_memory": "measured VRAM (bench)",
                     "quality": "quality (bench)"}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def card_stage(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, inputs: CardInputs) -> Stage[CardRecord]:
    """Render, lint and stage the card of `quant` from `inputs` (the shards record lists the GGUF files)."""
    manifest = build_manifest(pipeline, quant, inputs, ws)
    manifest_body = manifest_text(manifest)
    template = pipeline.card.template or DEFAULT_TEMPLATE
    folder = ws.repo_dir(quant.type)
    gguf_files = inputs.shards.files
    imatrix_file = inputs.imatrix_file
    published = [*gguf_files, *([imatrix_file] if imatrix_file else [])]

    def key() -> dict:
        return {"manifest_sha256": _sha(manifest_body), "templates_sha256": templates_sha256(template)}

    def run() -> CardRecord:
        facts = card_facts(manifest)
        text = render_card(facts, template)
        findings = lint_card(text, README_NAME, manifest, template)
        if findings:
            shown = "; ".join(f.format(README_NAME) for f in findings[:3])
            more = f" (+{len(findings) - 3} more)" if len(findings) > 3 else ""
            raise CheckFailed(f"{template}: the card it renders for {quant.type} fails lint, so it was not "
                              f"written: {shown}{more}")
        folder.mkdir(parents=True, exist_ok=True)
        for ref in published:
            _link_artifact(Path(ref.path), folder / Path(ref.path).name, ws, copy_outside=ref not in gguf_files)
        write_text_atomic(folder / MANIFEST_NAME, manifest_body)
        write_text_atomic(folder / README_NAME, text)
        for stray in folder.iterdir():
            if stray.name not in manifest.repo_files:
                stray.unlink()
        return CardRecord(
            quant=quant.type, repo_id=manifest.repo_id, folder=str(folder),
            readme=FileRef(path=str(folder / README_NAME), size=len(text.encode()), sha256=_sha(text)),
            manifest=FileRef(path=str(folder / MANIFEST_NAME), size=len(manifest_body.encode()),
                             sha256=_sha(manifest_body)),
            repo_files=list(manifest.repo_files), template=str(template), templates_sha256=key()["templates_sha256"],
            not_measured=[label for k, label in MEASURED_SECTIONS.items() if facts[k] is None],
        )

    return Stage("card", quant.type, key=key, run=run, intact=lambda r: _staged_intact(r, published, ws),
                 lock=f"repo-{quant.type}")


def _staged_intact(record: CardRecord, published: list[FileRef], ws: Workspace) -> bool:
    folder = Path(record.folder)
    if not folder.is_dir() or sorted(p.name for p in folder.iterdir() if p.is_file()) != record.repo_files:
        return False
    readme = folder / README_NAME
    return (all(_staged(folder / Path(ref.path).name, ref, ws) for ref in published)
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
    An importance matrix given by path (`copy_outside`) may live anywhere; it is small, and copied."""
    inside = _in_workspace(artifact, ws)
    if not inside and not copy_outside:
        raise InputError(f"{artifact}: not in the workspace {ws.root}, so it is not staged; run moeq quantize "
                         "--force for this quant")
    if staged.exists() and os.path.samefile(staged, artifact):
        return
    partial = partial_path(staged)
    partial.unlink(missing_ok=True)
    if not inside:
        shutil.copyfile(artifact, partial)
        commit_file(partial, staged)
        return
    try:
        os.link(artifact, partial)
    except OSError:
        os.symlink(artifact.resolve(), partial)
    commit_file(partial, staged, synced=True)

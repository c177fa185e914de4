"""The card stage: records -> manifest -> facts -> README.md, linted, in a staged repo folder.

The staged folder (workspace/repos/<quant>/) holds exactly what the Hub repo will hold: the card, the
GGUF (a hard link to the quant, so no copy) and the records manifest. A card that fails lint is never
written.

    >>> outcome = make_card(pipeline, pipeline.quant("Q8_0"), Workspace(pipeline.workspace))
    >>> Path(outcome.record.folder) == Workspace(pipeline.workspace).repo_dir("Q8_0")
    True
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from moeq.cards.facts import card_facts
from moeq.cards.lint import lint_card
from moeq.cards.manifest import MANIFEST_NAME, README_NAME, build_manifest, manifest_text
from moeq.cards.render import DEFAULT_TEMPLATE, render_card, templates_sha256
from moeq.config import Pipeline, QuantSpec
from moeq.errors import CheckFailed, InputError
from moeq.hub.split import repo_gguf_files
from moeq.quantize.stage import quantize_record
from moeq.records import CardRecord, FileRef
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace, commit_file, partial_path, write_text_atomic

MEASURED_SECTIONS = {"memory": "memory plan (validate)", "validation": "checks (validate)",
                     "speed": "speed (bench)", "measured_memory": "measured VRAM (bench)",
                     "quality": "quality (bench)"}


@dataclass
class CardOutcome:
    record: CardRecord
    skipped: bool
    warnings: list[str] = field(default_factory=list)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_card(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, force: bool = False,
              chain: Toolchain | None = None) -> CardOutcome:
    """Render, lint and stage the card of `quant`; skip when manifest and templates are unchanged.

    A quant over hub.max_shard_size is split first (with `chain`'s llama-gguf-split) and the card lists
    the shards.
    """
    warnings: list[str] = []
    quantized = quantize_record(pipeline, quant, ws)
    gguf_files = repo_gguf_files(pipeline, quantized, ws, chain)
    manifest = build_manifest(pipeline, quant, ws, quantized, gguf_files, warn=warnings.append)
    manifest_body = manifest_text(manifest)
    template = pipeline.card.template or DEFAULT_TEMPLATE
    templates_digest = templates_sha256(template)
    folder = ws.repo_dir(quant.type)
    record_path = ws.record_path("card", quant.type)
    with ws.lock(f"repo-{quant.type}"):
        previous = CardRecord.load(record_path)
        if (not force and previous and previous.manifest.sha256 == _sha(manifest_body)
                and previous.templates_sha256 == templates_digest and _staged_intact(previous, gguf_files)):
            return CardOutcome(previous, skipped=True, warnings=warnings)
        facts = card_facts(manifest)
        text = render_card(facts, template)
        findings = lint_card(text, README_NAME, manifest, template)
        if findings:
            shown = "; ".join(f.format(README_NAME) for f in findings[:3])
            more = f" (+{len(findings) - 3} more)" if len(findings) > 3 else ""
            raise CheckFailed(f"{template}: the card it renders for {quant.type} fails lint, so it was not "
                              f"written: {shown}{more}")
        folder.mkdir(parents=True, exist_ok=True)
        for ref in gguf_files:
            _link_artifact(Path(ref.path), folder / Path(ref.path).name, ws)
        write_text_atomic(folder / MANIFEST_NAME, manifest_body)
        write_text_atomic(folder / README_NAME, text)
        for stray in folder.iterdir():
            if stray.name not in manifest["repo_files"]:
                stray.unlink()
        record = CardRecord(
            quant=quant.type, repo_id=manifest["repo_id"], folder=str(folder),
            readme=FileRef(str(folder / README_NAME), len(text.encode()), _sha(text)),
            manifest=FileRef(str(folder / MANIFEST_NAME), len(manifest_body.encode()), _sha(manifest_body)),
            repo_files=list(manifest["repo_files"]), template=str(template), templates_sha256=templates_digest,
            not_measured=[label for key, label in MEASURED_SECTIONS.items() if facts[key] is None],
        )
        record.save(record_path)
    return CardOutcome(record, skipped=False, warnings=warnings)


def _staged_intact(record: CardRecord, gguf_files: list[FileRef]) -> bool:
    folder = Path(record.folder)
    if not folder.is_dir() or sorted(p.name for p in folder.iterdir() if p.is_file()) != record.repo_files:
        return False
    staged = [(folder / Path(ref.path).name, ref.path) for ref in gguf_files]
    readme = folder / README_NAME
    return (all(s.exists() and os.path.samefile(s, original) for s, original in staged)
            and _sha(readme.read_text(encoding="utf-8")) == record.readme.sha256)


def _link_artifact(artifact: Path, staged: Path, ws: Workspace) -> None:
    """Hard-link the quant into the staged repo (a symlink across filesystems); never a partial file.

    Only a file of this workspace is staged: a copied workspace never publishes the original's file."""
    if not Path(os.path.abspath(artifact)).is_relative_to(os.path.abspath(ws.root)):
        raise InputError(f"{artifact}: not in the workspace {ws.root}, so it is not staged; run moeq quantize "
                         "--force for this quant")
    if staged.exists() and os.path.samefile(staged, artifact):
        return
    partial = partial_path(staged)
    partial.unlink(missing_ok=True)
    try:
        os.link(artifact, partial)
    except OSError:
        os.symlink(artifact.resolve(), partial)
    commit_file(partial, staged, synced=True)

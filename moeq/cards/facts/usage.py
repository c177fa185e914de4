"""The facts of a quant's file (partials/usage.md.j2 and the files table): its files, download pattern, -hf tag."""

from __future__ import annotations

import re
from dataclasses import dataclass

from moeq.cards.facts.shared import QUANT_ADVICE, hub_url
from moeq.config import Layout
from moeq.manifest import LadderEntry, Manifest, QuantEntry
from moeq.records import QuantizeRecord
from moeq.units import binary_size, decimal_size


@dataclass(frozen=True)
class FileRow:
    name: str  # the path in the repo
    size: str
    sha256: str
    url: str


@dataclass(frozen=True)
class RecipeFileLink:
    name: str
    sha256: str
    url: str


@dataclass(frozen=True)
class FileFacts:
    type: str
    label: str  # the file's quant label: TYPE_MOEQ for a searched recipe
    recipe_file: RecipeFileLink | None
    advice: str
    file_type: int
    files: list[FileRow]
    file: str  # the first shard when split: llama.cpp loads the rest from it
    local_path: str
    sharded: bool
    shard_count: int
    download_pattern: str
    hf_tag: str  # llama.cpp's -hf and Ollama's hf.co/ name for this quant
    size: str
    bpw: str
    source_bpw: str
    source_size: str


@dataclass(frozen=True)
class SiblingFacts:
    quant: str
    repo_id: str
    url: str
    file: str | None
    size: str | None
    bpw: str | None
    cpu_moe_vram: str | None
    advice: str


def file_facts(manifest: Manifest, entry: QuantEntry, quantized: QuantizeRecord) -> FileFacts:
    repo_id = manifest.repo_id
    single = manifest.layout == Layout.SINGLE
    files = [FileRow(f.name, decimal_size(f.size), f.sha256, f"{hub_url(repo_id)}/resolve/main/{f.name}")
             for f in entry.files]
    first = files[0].name
    sharded = len(files) > 1
    if sharded and "/" in first:
        include = first.rsplit("/", 1)[0] + "/*"
    else:
        include = re.sub(r"-\d{5}-of-(\d{5})\.gguf$", r"-*-of-\1.gguf", first)
    label = entry.label
    return FileFacts(
        type=entry.quant,
        label=label,
        recipe_file=None if entry.recipe_file is None else RecipeFileLink(
            entry.recipe_file.name, entry.recipe_file.sha256,
            f"{hub_url(repo_id)}/resolve/main/{entry.recipe_file.name}"),
        advice=QUANT_ADVICE.get(entry.quant, ""),
        file_type=quantized.file_type,
        files=files,
        file=first,
        local_path=f"models/{first}",
        sharded=sharded,
        shard_count=len(files),
        download_pattern=include,
        hf_tag=f"{repo_id}:{label}" if single else repo_id,
        size=decimal_size(sum(f.size for f in entry.files)),
        bpw=f"{quantized.quant_bpw:.2f}",
        source_bpw=f"{quantized.model_bpw:.2f}",
        source_size=decimal_size(quantized.source.size),
    )


def sibling_facts(row: LadderEntry) -> SiblingFacts:
    return SiblingFacts(
        quant=row.quant,
        repo_id=row.repo_id,
        url=hub_url(row.repo_id),
        file=row.file,
        size=decimal_size(row.size) if row.size is not None else None,
        bpw=f"{row.bpw:.2f}" if row.bpw is not None else None,
        cpu_moe_vram=binary_size(row.cpu_moe_gpu_bytes) if row.cpu_moe_gpu_bytes is not None else None,
        advice=QUANT_ADVICE.get(row.quant, ""),
    )

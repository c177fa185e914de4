"""The fetch stage: the F16 GGUF from the Hub (or synth/local), with a SourceRecord saying where it came from.

- `gguf`: one file, or all shards of a split model (merged with llama-gguf-split), at a pinned commit.
- `hf`: a safetensors repo (config, tokenizer, weights), converted with the pinned llama.cpp
  `convert_hf_to_gguf.py --outtype f16` (torch comes from the `convert` extra).
The revision is resolved to a commit sha first, so every file comes from the same commit; each file
is checked against the sha256 the Hub reports, and downloads resume after an interruption.

    >>> outcome = fetch_source(pipeline, Workspace(pipeline.workspace), hub_api(), Toolchain())
    >>> outcome.record.origin
    'microsoft/Phi-3.5-MoE-instruct@<sha>'
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from moeq.config import Pipeline
from moeq.errors import HubError, ResourceError, ToolError
from moeq.hub.client import hub_errors
from moeq.hub.download import download_verified
from moeq.records import FileRef, SourceRecord
from moeq.runner import run_tool
from moeq.source import record_source, source_file
from moeq.toolchain import Toolchain, pinned_src_dir
from moeq.workspace import Workspace, commit_file, free_bytes, partial_path

# README.md is the model card: convert_hf_to_gguf.py takes general.license, name, base model, tags and
# languages from its frontmatter (gguf-py metadata.py); the license file travels with it.
HF_PATTERNS = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "*.safetensors", "model.safetensors.index.json",
               "README.md", "LICENSE", "LICENSE.*")
SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<n>\d{5})-of-(?P<total>\d{5})\.gguf$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
DISK_MARGIN = 1.05


@dataclass
class FetchOutcome:
    record: SourceRecord
    skipped: bool


def fetch_source(pipeline: Pipeline, ws: Workspace, api: HfApi | None, chain: Toolchain | None = None, *,
                 force: bool = False, on_message: Callable[[str], None] = lambda _msg: None) -> FetchOutcome:
    spec = pipeline.source
    ws.ensure()
    if spec.kind in ("synth", "local"):
        previous = SourceRecord.load(ws.record_path("source"))
        path = source_file(pipeline, ws)
        record = record_source(pipeline, ws, path, ws.hashes.sha256(path))
        return FetchOutcome(record, skipped=previous is not None and previous.to_dict() == record.to_dict())
    target = ws.source_path(pipeline.model.file_stem)
    with ws.lock("source", on_wait=on_message):
        previous = SourceRecord.load(ws.record_path("source"))
        if not force and previous and _pinned_and_current(previous, spec, target, ws):
            return FetchOutcome(previous, skipped=True)
        with hub_errors("resolving the revision", spec.repo):
            commit = api.model_info(spec.repo, revision=spec.revision or "main").sha
        if not SHA_RE.match(spec.revision or ""):
            on_message(f"warning: source.revision {spec.revision or 'main'!r} is not a commit sha; using {commit}, "
                       f"its commit now. Pin it in {pipeline.path} for a reproducible release")
        if not force and previous and previous.options.get("commit") == commit and _intact(previous, target, ws):
            return FetchOutcome(previous, skipped=True)
        started = time.monotonic()
        if spec.kind == "gguf":
            files = _fetch_gguf(pipeline, ws, api, chain, commit, target, on_message)
        else:
            files = _fetch_hf(pipeline, ws, api, commit, target, on_message)
        sha = ws.hashes.sha256(target)
        from moeq.quantize.stage import inspect_source

        inspect_source(target, allow_requantize=False)
        record = SourceRecord(
            kind=spec.kind, origin=f"{spec.repo}@{commit}" + (f"/{spec.file}" if spec.file else ""),
            output=FileRef(str(target), target.stat().st_size, sha), wall_s=round(time.monotonic() - started, 3),
            options={"repo": spec.repo, "revision": spec.revision, "commit": commit, "file": spec.file,
                     "files": files},
        )
        record.save(ws.record_path("source"))
    return FetchOutcome(record, skipped=False)


def _intact(record: SourceRecord, target: Path, ws: Workspace) -> bool:
    return target.is_file() and target.stat().st_size == record.output.size and \
        ws.hashes.sha256(target) == record.output.sha256


def _pinned_and_current(record: SourceRecord, spec, target: Path, ws: Workspace) -> bool:
    """Up to date without asking the Hub: the revision is a commit sha and the record is of it."""
    options = record.options
    return (bool(SHA_RE.match(spec.revision or "")) and record.kind == spec.kind and options.get("repo") == spec.repo
            and options.get("commit") == spec.revision and options.get("file") == spec.file
            and _intact(record, target, ws))


def _entries(api: HfApi, repo: str, commit: str, names: list[str]) -> list[RepoFile]:
    with hub_errors("listing files", repo):
        found = {e.path: e for e in api.get_paths_info(repo, names, revision=commit) if isinstance(e, RepoFile)}
    missing = [n for n in names if n not in found]
    if missing:
        raise HubError(f"{repo}@{commit[:12]}: no file {missing[0]}; check source.file in the pipeline file")
    return [found[n] for n in names]


def _check_disk(ws: Workspace, need: int) -> None:
    free = free_bytes(ws.source_dir)
    if free < need * DISK_MARGIN:
        raise ResourceError(f"{ws.source_dir}: {free / 2**20:.0f} MiB free, the source needs about "
                            f"{need * DISK_MARGIN / 2**20:.0f} MiB; free some space or move the workspace")


def _download_all(api: HfApi, repo: str, commit: str, entries: list[RepoFile], folder: Path,
                  on_message: Callable[[str], None]) -> list[dict]:
    files = []
    for entry in entries:
        on_message(f"{repo}: {entry.path} ({entry.size / 2**20:.1f} MiB)")
        sha = download_verified(api, repo, commit, entry, folder / entry.path)
        files.append({"name": entry.path, "size": entry.size, "sha256": sha})
    return files


def _fetch_gguf(pipeline: Pipeline, ws: Workspace, api: HfApi, chain: Toolchain | None, commit: str,
                target: Path, on_message: Callable[[str], None]) -> list[dict]:
    spec = pipeline.source
    shard = SHARD_RE.match(Path(spec.file).name)
    names = [spec.file]
    if shard:
        prefix = spec.file[: -len(Path(spec.file).name)]
        total = int(shard["total"])
        names = [f"{prefix}{shard['stem']}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]
    entries = _entries(api, spec.repo, commit, names)
    size = sum(e.size for e in entries)
    _check_disk(ws, size * (2 if shard else 1))
    folder = ws.source_dir / "download"
    files = _download_all(api, spec.repo, commit, entries, folder, on_message)
    if not shard:
        commit_file(folder / spec.file, target, synced=True)
        ws.hashes.remember(target, files[0]["sha256"])  # verified while downloading: no second read
        return files
    merging = partial_path(target)
    merging.unlink(missing_ok=True)
    chain = chain or Toolchain(pipeline.toolchain.llama_cpp_bin)
    run_tool([str(chain.tool("llama-gguf-split").path), "--merge", str(folder / names[0]), str(merging)],
             ws.source_dir / "llama-gguf-split.log")
    commit_file(merging, target)
    for name in names:
        (folder / name).unlink()
    return files


def _fetch_hf(pipeline: Pipeline, ws: Workspace, api: HfApi, commit: str, target: Path,
              on_message: Callable[[str], None]) -> list[dict]:
    spec = pipeline.source
    if importlib.util.find_spec("torch") is None:
        raise ToolError("converting a safetensors model needs torch, transformers and sentencepiece: "
                        "install them with .venv/bin/pip install -e '.[convert]'")
    with hub_errors("listing files", spec.repo):
        tree = [e for e in api.list_repo_tree(spec.repo, revision=commit, recursive=True) if isinstance(e, RepoFile)]
    entries = [e for e in tree if any(fnmatch.fnmatch(e.path, p) for p in HF_PATTERNS)]
    if not any(e.path.endswith(".safetensors") for e in entries):
        raise HubError(f"{spec.repo}@{commit[:12]}: no .safetensors weights; source.kind hf needs a safetensors "
                       "repo (use kind gguf for a GGUF repo)")
    size = sum(e.size for e in entries)
    _check_disk(ws, size * 2)
    folder = ws.source_dir / "hf" / f"{spec.repo.replace('/', '--')}@{commit[:12]}"
    files = _download_all(api, spec.repo, commit, entries, folder, on_message)
    converter = pinned_src_dir() / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise ToolError(f"{converter}: the pinned llama.cpp converter is missing; run scripts/build-llama-cpp")
    partial = partial_path(target)
    partial.unlink(missing_ok=True)
    on_message(f"{spec.repo}: converting to F16 GGUF with {converter.name}")
    env = {**os.environ, "PYTHONPATH": str(pinned_src_dir() / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    try:
        run_tool([sys.executable, str(converter), str(folder), "--outtype", "f16", "--outfile", str(partial)],
                 ws.source_dir / "convert.log", env=env)
        commit_file(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)  # the F16 GGUF holds it all; the commit can be fetched again
    return files

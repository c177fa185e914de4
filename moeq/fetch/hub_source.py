"""Fetching a Hub source: the F16 GGUF from the Hub, at the commit the fetch stage's key resolved.

- `gguf`: one file, or all shards of a split model (merged with llama-gguf-split), at a pinned commit.
- `hf`: a safetensors repo (config, tokenizer, weights), converted with the pinned llama.cpp
  `convert_hf_to_gguf.py --outtype f16` (torch comes from the `convert` extra).
Every file comes from the same commit; each is checked against the sha256 the Hub reports, and
downloads resume after an interruption.
"""

from __future__ import annotations

import fnmatch
import json
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from moeq.config import Pipeline
from moeq.errors import HubError, ToolError
from moeq.gguf_header import SPLIT_NAME_RE, read_header, read_source_header, shard_names
from moeq.hub.client import hub_errors
from moeq.hub.download import download_all, listed_files
from moeq.records import FileRef, FetchRecord
from moeq.runner import run_tool
from moeq.toolchain import Toolchain, pinned_src_dir
from moeq.workspace import Workspace, commit_file, partial_file, require_free

# README.md is the model card: convert_hf_to_gguf.py takes general.license, name, base model, tags and
# languages from its frontmatter (gguf-py metadata.py); the license file travels with it.
# The chat template is in tokenizer_config.json, or (transformers' newer layout) in chat_template.jinja or .json.
HF_PATTERNS = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "*.safetensors", "model.safetensors.index.json",
               "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja",
               "README.md", "LICENSE", "LICENSE.*")


def fetch_hub_source(pipeline: Pipeline, ws: Workspace, api: HfApi, chain: Toolchain | None, commit: str,
                     on_message: Callable[[str], None] = lambda _msg: None) -> FetchRecord:
    """Download (and convert) the source at `commit`; the fetch stage (stage.py) decides when."""
    spec = pipeline.source
    target = ws.source_path(pipeline.model.file_stem)
    license_file = None
    if spec.kind == "gguf":
        files = _fetch_gguf(pipeline, ws, api, chain, commit, target, on_message)
    else:
        files, license_file = _fetch_hf(pipeline, ws, api, commit, target, on_message)
    sha = ws.hashes.sha256(target)
    read_source_header(target, allow_requantize=False)
    return FetchRecord(
        kind=spec.kind, origin=f"{spec.repo}@{commit}" + (f"/{spec.file}" if spec.file else ""),
        output=FileRef(path=str(target), size=target.stat().st_size, sha256=sha),
        options={"repo": spec.repo, "revision": spec.revision, "commit": commit, "file": spec.file, "files": files},
        license=license_file,
    )


def _fetch_gguf(pipeline: Pipeline, ws: Workspace, api: HfApi, chain: Toolchain | None, commit: str,
                target: Path, on_message: Callable[[str], None]) -> list[dict]:
    spec = pipeline.source
    names = shard_names(spec.file)
    shard = SPLIT_NAME_RE.match(Path(spec.file).name) is not None  # even 1 of 1 is merged into one file
    entries = listed_files(api, spec.repo, commit, names, "check source.file in the pipeline file")
    size = sum(e.size for e in entries)
    require_free(ws.source_dir, size * (2 if shard else 1), "the source")
    folder = ws.source_dir / "download"
    files = download_all(api, spec.repo, commit, entries, folder, on_message)
    if not shard:
        commit_file(folder / spec.file, target, synced=True)
        ws.hashes.remember(target, files[0]["sha256"])  # verified while downloading: no second read
        return files
    chain = chain or pipeline.toolchain.chain()
    with partial_file(target) as merging:
        run_tool([str(chain.tool("llama-gguf-split").path), "--merge", str(folder / names[0]), str(merging)],
                 ws.source_dir / "llama-gguf-split.log")
    for name in names:
        (folder / name).unlink()
    return files


def _fetch_hf(pipeline: Pipeline, ws: Workspace, api: HfApi, commit: str, target: Path,
              on_message: Callable[[str], None]) -> tuple[list[dict], FileRef | None]:
    spec = pipeline.source
    if importlib.util.find_spec("torch") is None:
        raise ToolError("convert_hf_to_gguf.py", "converting a safetensors model needs torch, transformers and "
                        "sentencepiece", "install them with .venv/bin/pip install -e '.[convert]'")
    with hub_errors("listing files", spec.repo):
        tree = [e for e in api.list_repo_tree(spec.repo, revision=commit, recursive=True) if isinstance(e, RepoFile)]
    entries = [e for e in tree if any(fnmatch.fnmatch(e.path, p) for p in HF_PATTERNS)]
    if not any(e.path.endswith(".safetensors") for e in entries):
        raise HubError(f"{spec.repo}@{commit[:12]}", "no .safetensors weights",
                       "point source.repo at a safetensors repo, or use source.kind gguf for a GGUF repo")
    size = sum(e.size for e in entries)
    require_free(ws.source_dir, size * 2, "the source")
    folder = ws.source_dir / "hf" / f"{spec.repo.replace('/', '--')}@{commit[:12]}"
    files = download_all(api, spec.repo, commit, entries, folder, on_message)
    on_message(f"{spec.repo}: converting to F16 GGUF with convert_hf_to_gguf.py")
    convert_checkpoint(folder, target, ws.source_dir / "convert.log")
    license_file = _keep_license(folder, files, ws.source_dir / "license")
    shutil.rmtree(folder, ignore_errors=True)  # the F16 GGUF holds it all; the commit can be fetched again
    return files, license_file


def _keep_license(folder: Path, files: list[dict], keep: Path) -> FileRef | None:
    """The checkpoint's own license text (LICENSE, else LICENSE.md, LICENSE.txt, ...), moved out of the download
    folder to be published beside the quants; None when it has none."""
    names = sorted((f["name"] for f in files if fnmatch.fnmatch(f["name"], "LICENSE*") and "/" not in f["name"]),
                   key=lambda name: (name != "LICENSE", name))
    if not names:
        return None
    name = names[0]
    entry = next(f for f in files if f["name"] == name)
    keep.mkdir(parents=True, exist_ok=True)
    for old in keep.iterdir():  # another commit's
        old.unlink()
    os.replace(folder / name, keep / name)
    return FileRef(path=str(keep / name), size=entry["size"], sha256=entry["sha256"])


def checkpoint_chat_template(folder: Path) -> tuple[str | None, str]:
    """The checkpoint's one chat template, where the converter takes it from (gguf-py's SpecialVocab: tokenizer_config
    .json, else chat_template.jinja, else chat_template.json), and that file's name; (None, "") without one, or
    when it is a list of named templates (the converter writes those as it finds them)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and "chat_template" in config:
        template = config["chat_template"]
        return (template, "tokenizer_config.json") if isinstance(template, str) else (None, "")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        extra = folder / "additional_chat_templates"
        return (None, "") if extra.is_dir() and any(extra.glob("*.jinja")) else \
            (jinja.read_text(encoding="utf-8"), jinja.name)
    try:
        template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None, ""
    return (template, "chat_template.json") if isinstance(template, str) else (None, "")


def convert_checkpoint(folder: Path, target: Path, log: Path, model_name: str | None = None) -> None:
    """A safetensors checkpoint folder -> F16 GGUF at `target`, whole or not at all, with the pinned converter."""
    converter = pinned_src_dir() / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise ToolError(converter, "the pinned llama.cpp converter is missing", "run scripts/build-llama-cpp")
    env = {**os.environ, "PYTHONPATH": str(pinned_src_dir() / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    with partial_file(target) as partial:
        command = [sys.executable, str(converter), str(folder), "--outtype", "f16", "--outfile", str(partial)]
        if model_name:
            command += ["--model-name", model_name]
        run_tool(command, log, env=env)
        expected, where = checkpoint_chat_template(folder)
        if expected is not None and read_header(partial).metadata.get("tokenizer.chat_template") != expected:
            raise ToolError("convert_hf_to_gguf.py", f"the F16 it wrote does not carry the chat template of {where}",
                            f"see {log}; a GGUF without its template gives every client the wrong prompt format")

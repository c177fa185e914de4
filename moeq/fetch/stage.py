"""The fetch stage: the F16 GGUF every quant is made from (the source), and its FetchRecord.

`synth` writes the tiny model into the workspace; `local` uses a GGUF on disk in place; the Hub kinds
(`gguf`, `hf`) are downloaded (and converted) by hub_source.py. `fetch_stage` declares the stage for the
stage runner: its key is the synth options, the local file's sha256, or the Hub commit.

    result = run_stage(fetch_stage(pipeline, ws, api, chain), Records(ws))
    result.record.output.path
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Callable

from moeq.config import Pipeline
from moeq.errors import InputError
from moeq.hub.download import resolve_commit
from moeq.records import FileRef, FetchRecord
from moeq.stage_runner import Stage
from moeq.toolchain import PINNED_COMMIT
from moeq.workspace import Workspace, partial_file

HUB_KINDS = ("gguf", "hf")


def fetch_stage(pipeline: Pipeline, ws: Workspace, api=None, chain=None,
                 on_message: Callable[[str], None] = lambda _msg: None) -> Stage[FetchRecord]:
    spec = pipeline.source
    ws.ensure()
    if spec.kind == "synth":
        return _synth_stage(pipeline, ws, on_message)
    if spec.kind == "local":
        return _local_stage(pipeline, ws)
    target = ws.source_path(pipeline.model.file_stem)
    resolved: dict[str, str] = {}  # the commit the key found, so run() fetches exactly that one

    def key() -> dict:
        commit = resolve_commit(api, spec.repo, spec.revision, "source.revision", pipeline.path, on_message)
        resolved["commit"] = commit
        return {"kind": spec.kind, "repo": spec.repo, "file": spec.file, "commit": commit}

    def run() -> FetchRecord:
        from moeq.fetch.hub_source import fetch_hub_source

        return fetch_hub_source(pipeline, ws, api, chain, resolved["commit"], on_message)

    return Stage("fetch", None, key=key, run=run, intact=lambda r: _intact(r, target, ws))


def _synth_stage(pipeline: Pipeline, ws: Workspace, on_message: Callable[[str], None]) -> Stage[FetchRecord]:
    spec = pipeline.source
    target = ws.source_path(pipeline.model.file_stem)
    options = dataclasses.asdict(spec.synth)

    def run() -> FetchRecord:
        described = ", ".join(f"{k}={v}" for k, v in options.items())
        if spec.train:
            from moeq.synth_train import trained_checkpoint, training_key

            _copy_into(_converted(trained_checkpoint(spec.synth, on_message), pipeline.model.name, on_message), target)
            origin = (f"synth {described}, trained on moeq's training text (key {training_key(spec.synth)}) and "
                      "converted with convert_hf_to_gguf.py")
        else:
            from moeq.synth import write_synth_model

            write_synth_model(target, spec.synth, spec.arch, name=pipeline.model.name)
            origin = f"synth {spec.arch} {described}"
        return FetchRecord(kind="synth", origin=origin, options={**options, "train": spec.train, "arch": spec.arch},
                            output=FileRef(path=str(target), size=target.stat().st_size,
                                           sha256=ws.hashes.sha256(target)))

    def key() -> dict:
        key = {"kind": "synth", "synth": options, "name": pipeline.model.name, "arch": spec.arch}
        if spec.train:
            from moeq.synth_train import training_key

            key |= {"train": training_key(spec.synth), "converter": PINNED_COMMIT}
        return key

    return Stage("fetch", None, key=key, run=run, intact=lambda r: _intact(r, target, ws))


def _converted(checkpoint: Path, name: str, on_message: Callable[[str], None]) -> Path:
    """The trained checkpoint as F16 GGUF, converted once per model name and converter (cached beside it)."""
    from moeq.fetch.hub_source import convert_checkpoint

    tag = hashlib.sha256(f"{name}\0{PINNED_COMMIT}".encode()).hexdigest()[:12]
    converted = checkpoint.parent / f"F16-{tag}.gguf"
    if not converted.is_file():
        on_message(f"{checkpoint}: converting to F16 GGUF with convert_hf_to_gguf.py")
        convert_checkpoint(checkpoint, converted, checkpoint.parent / f"convert-{tag}.log", model_name=name)
    return converted


def _copy_into(cached: Path, target: Path) -> None:
    with partial_file(target) as partial, open(cached, "rb") as source, open(partial, "wb") as out:
        try:
            shutil.copyfileobj(source, out, 1 << 20)
        except OSError as exc:  # a full disk is the workspace's, whichever file the OS names
            raise OSError(exc.errno, exc.strerror, str(target)) from None


def _local_stage(pipeline: Pipeline, ws: Workspace) -> Stage[FetchRecord]:
    path = Path(pipeline.source.path)

    def key() -> dict:
        if not path.is_file():
            raise InputError(path, "source.path does not exist", f"fix source.path in {pipeline.path}")
        return {"kind": "local", "path": str(path), "sha256": ws.hashes.sha256(path)}

    def run() -> FetchRecord:
        return FetchRecord(kind="local", origin=str(path),
                            output=FileRef(path=str(path), size=path.stat().st_size, sha256=ws.hashes.sha256(path)))

    return Stage("fetch", None, key=key, run=run)


def fetched_source(pipeline: Pipeline, ws: Workspace, record: FetchRecord | None) -> FetchRecord:
    """The Hub source as moeq fetch recorded it; the commands after fetch never download. A source deleted after
    the build (84 GB freed) still keys the stages that are current (by its sha256); a stage that must read it
    again says it is gone."""
    target = ws.source_path(pipeline.model.file_stem)
    if record is None or record.kind != pipeline.source.kind:
        raise InputError(target, f"the {pipeline.source.kind} source has not been fetched",
                         f"run moeq fetch --config {pipeline.path}")
    if target.exists() and not _intact(record, target, ws):
        raise InputError(target, "not the file moeq fetch recorded", f"run moeq fetch --config {pipeline.path} --force")
    return record


def _intact(record: FetchRecord, target: Path, ws: Workspace) -> bool:
    return (target.is_file() and target.stat().st_size == record.output.size
            and ws.hashes.sha256(target) == record.output.sha256)

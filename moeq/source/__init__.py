"""The source stage: the F16 GGUF every quant is made from, and its SourceRecord.

`synth` writes the tiny model into the workspace; `local` uses a GGUF on disk in place.
The Hub kinds (`hf`, `gguf`) are fetched by the fetch stage.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from moeq.config import Pipeline
from moeq.errors import InputError
from moeq.records import FileRef, SourceRecord
from moeq.workspace import Workspace, hash_cache


def prepare_source(pipeline: Pipeline, ws: Workspace) -> SourceRecord:
    """Make sure the F16 source exists and is recorded; reuse the record when still current."""
    ws.ensure()
    record_path = ws.record_path("source")
    previous = SourceRecord.load(record_path)
    spec = pipeline.source
    hashes = hash_cache(ws)
    started = time.monotonic()
    if spec.kind == "synth":
        from moeq.synth import write_tiny_phimoe

        options = dataclasses.asdict(spec.synth)
        target = ws.source_path(pipeline.model.file_stem)
        if previous and previous.options == options and _still_there(previous.output, hashes):
            return previous
        with ws.lock("source"):
            write_tiny_phimoe(target, spec.synth, name=pipeline.model.name)
        origin = "synth " + ", ".join(f"{k}={v}" for k, v in options.items())
    elif spec.kind == "local":
        target, options = Path(spec.path), {}
        if not target.is_file():
            raise InputError(f"{target}: source.path does not exist; fix source.path in {pipeline.path}")
        origin = str(target)
    else:
        raise InputError(f"{pipeline.path}: source kind {spec.kind!r} is downloaded by the fetch stage, "
                         "which this version of moeq does not have yet; use kind local or synth")
    output = FileRef(str(target), target.stat().st_size, hashes.sha256(target))
    if previous and previous.output == output and previous.options == options:
        return previous
    record = SourceRecord(kind=spec.kind, origin=origin, output=output,
                          wall_s=round(time.monotonic() - started, 3), options=options)
    record.save(record_path)
    return record


def _still_there(ref: FileRef, hashes) -> bool:
    path = Path(ref.path)
    return path.is_file() and path.stat().st_size == ref.size and hashes.sha256(path) == ref.sha256

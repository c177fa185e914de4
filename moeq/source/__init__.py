"""The source stage: the F16 GGUF every quant is made from, and its SourceRecord.

`synth` writes the tiny model into the workspace; `local` uses a GGUF on disk in place.
The Hub kinds (`hf`, `gguf`) are fetched by the fetch stage (source/fetch.py); later stages find
the result here.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from moeq.config import Pipeline
from moeq.errors import InputError
from moeq.records import FileRef, SourceRecord
from moeq.workspace import Workspace


def source_file(pipeline: Pipeline, ws: Workspace) -> Path:
    """The F16 source on disk, made first when the pipeline says to synthesize it."""
    ws.ensure()
    spec = pipeline.source
    if spec.kind == "synth":
        from moeq.synth import write_tiny_phimoe

        target = ws.source_path(pipeline.model.file_stem)
        with ws.lock("source"):
            previous = SourceRecord.load(ws.record_path("source"))
            current = (previous is not None and previous.options == dataclasses.asdict(spec.synth)
                       and target.is_file() and target.stat().st_size == previous.output.size)
            if not current:
                # Recorded at once, so a concurrent moeq sees it is current and leaves it alone.
                started = time.monotonic()
                write_tiny_phimoe(target, spec.synth, name=pipeline.model.name)
                record_source(pipeline, ws, target, ws.hashes.sha256(target),
                              wall_s=round(time.monotonic() - started, 3))
        return target
    if spec.kind == "local":
        if not Path(spec.path).is_file():
            raise InputError(f"{spec.path}: source.path does not exist; fix source.path in {pipeline.path}")
        return Path(spec.path)
    target = ws.source_path(pipeline.model.file_stem)
    fetched = SourceRecord.load(ws.record_path("source"))
    if fetched is None or fetched.kind != spec.kind or not target.is_file():
        raise InputError(f"{target}: the {spec.kind} source has not been fetched; run moeq fetch --config "
                         f"{pipeline.path}")
    return target


def record_source(pipeline: Pipeline, ws: Workspace, path: Path, sha256: str, wall_s: float = 0.0) -> SourceRecord:
    """Write (or reuse) the SourceRecord for `path` whose sha256 the caller computed.

    wall_s is the time spent making the file (0 for a local file used in place)."""
    spec = pipeline.source
    if spec.kind in ("hf", "gguf"):  # the fetch stage wrote the record; it must still describe the file
        fetched = SourceRecord.load(ws.record_path("source"))
        if fetched is None or fetched.output.sha256 != sha256:
            raise InputError(f"{path}: not the file moeq fetch recorded; run moeq fetch --config {pipeline.path} "
                             "--force")
        return fetched
    options = dataclasses.asdict(spec.synth) if spec.kind == "synth" else {}
    origin = ("synth " + ", ".join(f"{k}={v}" for k, v in options.items())) if spec.kind == "synth" else str(path)
    output = FileRef(str(path), path.stat().st_size, sha256)
    record_path = ws.record_path("source")
    previous = SourceRecord.load(record_path)
    if previous and previous.output == output and previous.options == options and previous.kind == spec.kind:
        return previous
    record = SourceRecord(kind=spec.kind, origin=origin, output=output, wall_s=wall_s, options=options)
    record.save(record_path)
    return record

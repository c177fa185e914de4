"""The records stages write and read: the only hand-off between stages.

Each record is a dataclass saved as JSON with a schema version; a record of another schema
version is treated as absent (the stage runs again), never misread.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from moeq.workspace import write_text_atomic

SCHEMA_VERSION = 1

R = TypeVar("R", bound="Record")


@dataclass
class FileRef:
    path: str
    size: int
    sha256: str


@dataclass
class ToolBuildRef:
    version: str
    build: str
    commit: str
    compiler: str
    target: str


@dataclass
class Record:
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "stage": self.stage, **dataclasses.asdict(self)}

    def save(self, path: Path) -> None:
        """Save as JSON in WORKSPACE/records/; paths inside the workspace are kept relative to it."""
        data = _paths(self.to_dict(), _workspace_of(path), relative=True)
        write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls: type[R], path: Path) -> R | None:
        """The record at `path`, or None when absent, unreadable or of another schema.

        Workspace-relative paths come back under the workspace the record is in now, so a moved
        workspace keeps working and a copied one refers to its own files."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or data.get("stage") != cls.stage:
            return None
        try:
            return _from_dict(cls, _paths(data, _workspace_of(path), relative=False))
        except (TypeError, KeyError):
            return None


PATH_KEYS = ("path", "folder")  # the keys of a record that hold a file or folder


def _workspace_of(record_path: Path) -> Path:
    # WORKSPACE/records/NAME.json; abspath, not resolve: paths stay spelled as the workspace spells them
    return Path(os.path.abspath(record_path)).parent.parent


def _paths(value: Any, root: Path, relative: bool, key: str = "") -> Any:
    """Paths under `root` made relative to it (relative=True), or relative paths made absolute under it."""
    if isinstance(value, dict):
        return {k: _paths(v, root, relative, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_paths(v, root, relative, key) for v in value]
    if key not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    path = Path(value)
    if not relative:
        return value if path.is_absolute() else str(root / path)
    try:
        return path.relative_to(root).as_posix() if path.is_absolute() else value
    except ValueError:  # outside the workspace (a local source, an imatrix, a template): kept as it is
        return value


def _from_dict(cls, data: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        ftype = f.type if not isinstance(f.type, str) else _TYPES.get(f.type)
        if ftype in (FileRef, ToolBuildRef) and isinstance(value, dict):
            value = ftype(**value)
        elif f.type == "list[TensorRow]":
            value = [TensorRow(**row) for row in value]
        kwargs[f.name] = value
    return cls(**kwargs)


@dataclass
class SourceRecord(Record):
    stage = "source"
    kind: str
    origin: str  # repo@revision/file, a local path, or the synth options
    output: FileRef
    wall_s: float
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TensorRow:
    name: str
    shape: list[int]
    type_before: str
    type_after: str
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizeRecord(Record):
    stage = "quantize"
    quant: str
    file_type: int
    source: FileRef
    output: FileRef
    options: dict[str, Any]
    tool: ToolBuildRef
    command: list[str]
    wall_s: float
    tensors: list[TensorRow]
    model_size_mib: float
    model_bpw: float
    quant_size_mib: float
    quant_bpw: float
    fallback_tensors: int = 0
    threads: int | None = None
    model: dict[str, Any] = field(default_factory=dict)  # architecture facts read from the source header


@dataclass
class ValidateRecord(Record):
    stage = "validate"
    quant: str
    file: FileRef
    source: FileRef
    numerics: str
    ok: bool
    checks: list[dict]
    worst_tensors: list[dict]
    plan: dict


@dataclass
class BenchRecord(Record):
    stage = "bench"
    quant: str
    file: FileRef
    machine: dict[str, Any]  # cpu, cores, ram_bytes, gpus (name, memory), os, date
    tool: ToolBuildRef
    options: dict[str, Any]
    speed: list[dict]  # per mode: command, backends, gpu_info, tests (pp/tg avg_ts, stddev_ts)
    memory: list[dict]  # per mode and context: buffers per device, device_mib, planned_mib, difference_mib
    quality: dict | None  # base (F16) and quant figures from llama-perplexity
    errors: list[dict]  # per failed mode: mode, error
    wall_s: float
    not_measured: list[dict] = field(default_factory=list)  # per offload mode without a device: mode, reason


@dataclass
class CardRecord(Record):
    stage = "card"
    quant: str
    repo_id: str
    folder: str  # the staged repo: exactly the files the Hub repo will hold
    readme: FileRef
    manifest: FileRef
    repo_files: list[str]
    template: str
    templates_sha256: str
    not_measured: list[str]  # sections the card says "not measured" for, for want of a record


@dataclass
class PushRecord(Record):
    stage = "push"
    quant: str
    repo_id: str
    create_pr: bool
    commit: str | None  # None when nothing had changed
    commit_url: str | None
    pr_url: str | None
    files: list[dict]  # path, action, size, sha256
    uploaded_bytes: int
    readme_sha256: str
    wall_s: float


_TYPES = {"FileRef": FileRef, "ToolBuildRef": ToolBuildRef}

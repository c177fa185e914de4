"""Where records lie: WORKSPACE/records/STAGE[-QUANT].json, saved with a schema version and the key their
stage ran with (stage_runner.py), and loaded once per command (read again only when the file changed).

A record of another schema version, or one that does not match its type, is treated as absent (the stage
runs again), never misread. Paths inside the workspace are stored relative to it, so a moved workspace
keeps working and a copied one refers to its own files.

    records = Records(ws, "pipeline.yaml")
    records.get(QuantizeRecord, "Q8_0").output.sha256
    records.require(CardRecord, None)  # an InputError that says which command makes it when absent
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from moeq.errors import InputError
from moeq.records import RECORD_TYPES, SCHEMA_VERSION, Model, Record, record_json
from moeq.workspace import inside, write_json_atomic

R = TypeVar("R", bound=Record)

PATH_KEYS = ("path", "folder")  # the keys of a record that hold a file or folder
EARLIER_NAMES = {"fetch": "source"}  # a workspace made before the rename keeps its 84 GB source current


class Saved(Model):
    """A record as it lies in WORKSPACE/records/: what the stage made, with how and when it was made."""

    schema_version: int
    key: dict[str, Any] | None  # the stage's declared inputs when it ran (None: always runs)
    wall_s: float
    record: Any


def save_record(path: Path, record: Model, key: dict[str, Any] | None, wall_s: float) -> None:
    """Save under WORKSPACE/records/; paths inside the workspace are kept relative to it."""
    data = {"schema_version": SCHEMA_VERSION, "key": key, "wall_s": round(wall_s, 3),
            "record": _paths(record_json(record), _workspace_of(path), relative=True)}
    write_json_atomic(path, data)


def load_saved(path: Path, cls: type[R]) -> tuple[Saved | None, str | None]:
    """The saved record at `path` (its `record` of type `cls`), or None and why it cannot be used.

    Workspace-relative paths come back under the workspace the record is in now."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"unreadable ({exc.__class__.__name__})"
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        return None, f"written by another moeq (record schema {version}, this moeq reads {SCHEMA_VERSION})"
    try:
        saved = Saved.model_validate(data)
        saved.record = cls.model_validate(_paths(data["record"], _workspace_of(path), relative=False))
    except _PathOutside as exc:
        return None, f"names the path {str(exc)[:200]!r}, which leaves the workspace"
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        return None, f"not a {cls.stage_name()} record ({where}: {exc.errors()[0]['msg']})"
    return saved, None


def load_record(path: Path, cls: type[R]) -> R | None:
    saved, _why = load_saved(path, cls)
    return saved.record if saved else None


def _workspace_of(record_path: Path) -> Path:
    # WORKSPACE/records/NAME.json; abspath, not resolve: paths stay spelled as the workspace spells them
    return Path(os.path.abspath(record_path)).parent.parent


class _PathOutside(ValueError):
    """A record's workspace-relative path that climbs out of the workspace."""


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
        if path.is_absolute():
            return value
        within = inside(root, value)
        if within is None:
            raise _PathOutside(value)
        return str(within)
    try:
        return path.relative_to(root).as_posix() if path.is_absolute() else value
    except ValueError:  # outside the workspace (a local source, an imatrix, a template): kept as it is
        return value


class Records:
    """The workspace's records, each loaded once: what the stage functions receive as arguments.

    `get(Type, quant)` gives the record or None; `require` turns an absent one into one error that says which
    command makes it. The stage runner alone uses the by-subject methods (saved, put): a stage's record may
    be kept under a subject of its own (a candidate of the choice stage, "Q4_K_M-without-imatrix")."""

    def __init__(self, ws, config_path: Path | str = "pipeline.yaml"):
        self.ws = ws
        self.config_path = config_path
        self._cache: dict[tuple[str, str | None], tuple[tuple | None, Saved | None]] = {}
        self.reasons: dict[tuple[str, str | None], str] = {}

    def get(self, cls: type[R], quant: str | None = None) -> R | None:
        """The record, or None when there is none; a record that is there but cannot be read (a NaN, a field of
        another shape, another moeq's) is an InputError that says which command makes it again."""
        saved = self.saved(cls.stage_name(), quant)
        if saved is None and (cls.stage_name(), quant) in self.reasons:
            stage = cls.stage_name()
            option = f" --quant {quant}" if quant else ""
            raise InputError(self.ws.record_path(stage, quant), self.reasons[(stage, quant)],
                             f"run moeq {stage} --config {self.config_path}{option} --force")
        return saved.record if saved else None

    def require(self, cls: type[R], quant: str | None = None) -> R:
        stage = cls.stage_name()
        record = self.get(cls, quant)
        if record is None:
            path = self.ws.record_path(stage, quant)
            option = f" --quant {quant}" if quant else ""
            why = self.reasons.get((stage, quant), f"no {stage} record" + (f" for {quant}" if quant else ""))
            raise InputError(path, why, f"run moeq {stage} --config {self.config_path}{option} first")
        return record

    def saved(self, stage: str, subject: str | None = None, *, fresh: bool = False) -> Saved | None:
        """The saved record of `stage` for `subject`, loaded once; `fresh`: read again if the file changed since
        (the stage runner asks under the stage's lock, where another process may have written it)."""
        path = self.ws.record_path(stage, subject)
        if stage in EARLIER_NAMES and not path.exists():
            path = self.ws.record_path(EARLIER_NAMES[stage], subject)
        cached = self._cache.get((stage, subject))
        if cached is not None and not fresh:
            return cached[1]
        signature = _signature(path)
        if cached is not None and cached[0] == signature:
            return cached[1]
        saved, why = load_saved(path, RECORD_TYPES[stage])
        self._cache[(stage, subject)] = (signature, saved)
        self.reasons.pop((stage, subject), None)
        if why:
            self.reasons[(stage, subject)] = why
        return saved

    def put(self, stage: str, subject: str | None, saved: Saved) -> None:
        self._cache[(stage, subject)] = (_signature(self.ws.record_path(stage, subject)), saved)
        self.reasons.pop((stage, subject), None)


def _signature(path: Path) -> tuple | None:
    """What tells a record file changed without reading it (an atomic write is a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)

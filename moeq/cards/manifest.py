"""The records manifest: one JSON file, published beside the card, holding every record it was built from.

The card is rendered from this manifest and nothing else, so `moeq card lint --records` can rebuild the
same facts from the published manifest and check that every figure in the card comes from a record.
Local paths are reduced to file names: a maintainer's folders are nobody's business.

    >>> manifest = build_manifest(pipeline, quant, ws, quantize_record(pipeline, quant, ws), gguf_files)
    >>> manifest["records"]["quantize"]["quant_bpw"]
    8.5
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path, PurePath
from typing import Any, Callable

from moeq import __version__
from moeq.cards.render import DEFAULT_TEMPLATE, templates_sha256
from moeq.config import Pipeline, QuantSpec
from moeq.errors import InputError
from moeq.records import BenchRecord, FileRef, QuantizeRecord, Record, SourceRecord, ValidateRecord
from moeq.workspace import Workspace, read_text_limited

MANIFEST_NAME = "moeq-manifest.json"
README_NAME = "README.md"
MANIFEST_VERSION = 1
MAX_CARD_BYTES = 1 << 20  # a card is tens of KB
MAX_MANIFEST_BYTES = 16 << 20  # a manifest holds a row per tensor: hundreds of KB for the real model
PATH_KEYS = {"path", "file"}


def _strip_paths(value: Any, key: str = "") -> Any:
    """Replace local paths by file names, recursively; `X.partial` (what a tool wrote) by X."""
    if isinstance(value, dict):
        return {k: _strip_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_paths(v, key) for v in value]
    if not isinstance(value, str):
        return value
    if (key in PATH_KEYS or key == "command") and "/" in value or value.startswith(("/", "~")):
        value = PurePath(value).name
    if key == "command" and value.endswith(".partial"):
        value = value[: -len(".partial")]
    return value


def _record_dict(record: Record | None) -> dict | None:
    return _strip_paths(record.to_dict()) if record is not None else None


def current_record(ws: Workspace, kind: str, quant: str, quantized: QuantizeRecord | None,
                   warn: Callable[[str], None]) -> Record | None:
    """The validate or bench record of `quant` when it describes the current file; a stale one is ignored."""
    cls = {"validate": ValidateRecord, "bench": BenchRecord}[kind]
    record = cls.load(ws.record_path(kind, quant))
    if record is not None and quantized is not None and record.file.sha256 != quantized.output.sha256:
        warn(f"{ws.record_path(kind, quant)}: describes an older {quant} file; ignored (run moeq {kind} again)")
        return None
    return record


def build_manifest(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, quantized: QuantizeRecord,
                   gguf_files: list[FileRef], warn: Callable[[str], None] = lambda _msg: None) -> dict:
    """Collect this quant's records, its siblings' summaries and the pipeline's card facts.

    `gguf_files` are what the repo holds of the model: the quant, or its shards (hub/split.py).
    """
    if not quantized.model:
        raise InputError(f"{ws.record_path('quantize', quant.type)}: written by an older moeq without the "
                         f"model's facts; run moeq quantize --config {pipeline.path} --quant {quant.type} --force")
    validated = current_record(ws, "validate", quant.type, quantized, warn)
    if validated is not None and not validated.ok:
        failed = ", ".join(c["name"] for c in validated.checks if not c["ok"])
        raise InputError(f"{ws.record_path('validate', quant.type)}: {quant.type} failed validation ({failed}); "
                         f"fix the file before making its card")
    names = [Path(f.path).name for f in gguf_files]
    template = pipeline.card.template or DEFAULT_TEMPLATE
    return {
        "manifest_version": MANIFEST_VERSION,
        "generator": f"moeq {__version__}",
        "quant": quant.type,
        "repo_id": pipeline.repo_id(quant),
        "pipeline": {
            "model": _strip_paths(dataclasses.asdict(pipeline.model)),
            "card_extra": dict(pipeline.card.extra),
        },
        "card": {"template": template.name, "builtin": pipeline.card.template is None,
                 "templates_sha256": templates_sha256(template)},
        "files": [{"name": Path(f.path).name, "size": f.size, "sha256": f.sha256} for f in gguf_files],
        "repo_files": sorted([*names, README_NAME, MANIFEST_NAME]),
        "ladder": [_ladder_entry(pipeline, q, ws) for q in pipeline.quants],
        "records": {
            "source": _record_dict(SourceRecord.load(ws.record_path("source"))),
            "quantize": _record_dict(quantized),
            "validate": _record_dict(validated),
            "bench": _record_dict(current_record(ws, "bench", quant.type, quantized, warn)),
        },
    }


def _ladder_entry(pipeline: Pipeline, quant: QuantSpec, ws: Workspace) -> dict:
    """A sibling's row of the ladder table, from its own records (None where it has none)."""
    quantized = QuantizeRecord.load(ws.record_path("quantize", quant.type))
    validated = current_record(ws, "validate", quant.type, quantized, lambda _msg: None)
    cpu_moe = None
    if validated is not None:
        cpu_moe = next(p["gpu_bytes"] for p in validated.plan["weights"] if p["mode"] == "cpu-moe")
    return {
        "quant": quant.type,
        "repo_id": pipeline.repo_id(quant),
        "file": quant.file,
        "size": quantized.output.size if quantized else None,
        "bpw": quantized.quant_bpw if quantized else None,
        "cpu_moe_gpu_bytes": cpu_moe,
    }


def manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=False) + "\n"


def read_manifest(path: Path) -> dict:
    if not Path(path).exists():
        raise InputError(f"{path}: no records manifest; make the card with moeq card, or pass --records "
                         f"with the folder that holds {MANIFEST_NAME}")
    return parse_manifest(read_text_limited(path, MAX_MANIFEST_BYTES, "records manifest"), str(path))


def read_card(path: Path) -> str:
    """A card's text: a regular file of at most MAX_CARD_BYTES."""
    return read_text_limited(path, MAX_CARD_BYTES, "card (README.md)")


def parse_manifest(text: str, where: str) -> dict:
    """A records manifest's JSON text (`where` names it in errors)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{where}: not a readable records manifest ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("manifest_version") != MANIFEST_VERSION:
        raise InputError(f"{where}: not a moeq records manifest of version {MANIFEST_VERSION}; "
                         f"make the card again with this moeq")
    return data

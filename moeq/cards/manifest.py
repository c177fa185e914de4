"""Building the records manifest: one JSON file, published beside the card, holding every record it was built from.

The card is rendered from this manifest and nothing else, so `moeq card verify` can rebuild the same
facts from the published manifest and check that every figure in the card comes from a record.
Local paths are reduced to file names: a maintainer's folders are nobody's business.

    manifest = build_manifest(pipeline, quant, CardInputs.from_records(records, pipeline, quant, shards), ws)
    manifest.records.quantize.quant_bpw
    # -> 8.5
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Callable

from moeq import __version__
from moeq.cards.render import DEFAULT_TEMPLATE, templates_sha256
from moeq.config import Pipeline, QuantSpec
from moeq.errors import InputError
from moeq.manifest import MANIFEST_NAME, MANIFEST_VERSION, README_NAME, Manifest
from moeq.records import (BenchRecord, FileRef, ImatrixRecord, QuantizeRecord, Records, ShardsRecord, SourceRecord,
                          ValidateRecord, record_json)
from moeq.workspace import Workspace

PATH_KEYS = {"path", "file"}


@dataclass
class CardInputs:
    """The records a card is made from, each the current one for the quant's file (a stale one is None)."""

    source: SourceRecord | None
    quantized: QuantizeRecord
    validated: ValidateRecord | None
    bench: BenchRecord | None
    shards: ShardsRecord
    siblings: dict[str, tuple[QuantizeRecord | None, ValidateRecord | None]]  # every quant of the ladder
    imatrix: ImatrixRecord | None = None  # the imatrix stage's record, when the quant was made with its output

    @property
    def imatrix_file(self) -> FileRef | None:
        """The importance matrix the quant was made with: published in its repo."""
        used = self.quantized.options.imatrix
        if used is None:
            return None
        path = Path(used.path)
        return FileRef(path=used.path, size=path.stat().st_size if path.is_file() else 0, sha256=used.sha256)

    @classmethod
    def from_records(cls, records: Records, pipeline: Pipeline, quant: QuantSpec, shards: ShardsRecord,
                     warn: Callable[[str], None] = lambda _msg: None) -> "CardInputs":
        quantized = records.require("quantize", quant.type)
        siblings = {}
        for q in pipeline.quants:
            theirs = records.get("quantize", q.type)
            siblings[q.type] = (theirs, _current(records, "validate", q.type, theirs, lambda _msg: None))
        imatrix = records.get("imatrix")
        used = quantized.options.imatrix
        if imatrix is not None and (used is None or imatrix.output.sha256 != used.sha256):
            imatrix = None  # another matrix than the one this file was made with
        return cls(source=records.get("source"), quantized=quantized,
                   validated=_current(records, "validate", quant.type, quantized, warn),
                   bench=_current(records, "bench", quant.type, quantized, warn), shards=shards, siblings=siblings,
                   imatrix=imatrix)


def _current(records: Records, stage: str, quant: str, quantized: QuantizeRecord | None, warn: Callable[[str], None]):
    """The validate or bench record of `quant` when it describes the current file; a stale one is ignored."""
    record = records.get(stage, quant)
    if record is not None and quantized is not None and record.file.sha256 != quantized.output.sha256:
        warn(f"{records.ws.record_path(stage, quant)}: describes an older {quant} file; ignored (run moeq {stage} "
             "again)")
        return None
    return record


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


def _published(record) -> dict | None:
    return _strip_paths(record_json(record)) if record is not None else None


def build_manifest(pipeline: Pipeline, quant: QuantSpec, inputs: CardInputs, ws: Workspace) -> Manifest:
    """This quant's records, its siblings' summaries and the pipeline's card facts, as one Manifest."""
    validated = inputs.validated
    if validated is not None and not validated.ok:
        raise InputError(f"{ws.record_path('validate', quant.type)}: {quant.type} failed validation "
                         f"({', '.join(validated.failed)}); fix the file before making its card")
    files = inputs.shards.files
    names = [Path(f.path).name for f in files]
    imatrix_file = inputs.imatrix_file
    if imatrix_file is not None:
        name = Path(imatrix_file.path).name
        if name in (*names, README_NAME, MANIFEST_NAME):
            raise InputError(f"{imatrix_file.path}: the importance matrix would be published as {name}, a name the "
                             "repo already uses; rename the imatrix file")
        if not Path(imatrix_file.path).is_file() or ws.hashes.sha256(Path(imatrix_file.path)) != imatrix_file.sha256:
            raise InputError(f"{imatrix_file.path}: not the importance matrix {quant.type} was made with (gone or "
                             f"changed since); run moeq quantize --quant {quant.type} again")
        names.append(name)
    template = pipeline.card.template or DEFAULT_TEMPLATE
    return Manifest.model_validate({
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
        "files": [{"name": Path(f.path).name, "size": f.size, "sha256": f.sha256} for f in files],
        "imatrix_file": ({"name": Path(imatrix_file.path).name, "size": imatrix_file.size,
                          "sha256": imatrix_file.sha256} if imatrix_file else None),
        "repo_files": sorted([*names, README_NAME, MANIFEST_NAME]),
        "ladder": [_ladder_entry(pipeline, q, *inputs.siblings[q.type]) for q in pipeline.quants],
        "records": {
            "source": _published(inputs.source),
            "imatrix": _published(inputs.imatrix),
            "quantize": _published(inputs.quantized),
            "validate": _published(validated),
            "bench": _published(inputs.bench),
        },
    })


def _ladder_entry(pipeline: Pipeline, quant: QuantSpec, quantized: QuantizeRecord | None,
                  validated: ValidateRecord | None) -> dict:
    """A sibling's row of the ladder table, from its own records (None where it has none)."""
    cpu_moe = None
    if validated is not None:
        cpu_moe = validated.plan.placement(validated.plan.n_layer).gpu_bytes  # N = every layer: --cpu-moe
    return {
        "quant": quant.type,
        "repo_id": pipeline.repo_id(quant),
        "file": quant.file,
        "size": quantized.output.size if quantized else None,
        "bpw": quantized.quant_bpw if quantized else None,
        "cpu_moe_gpu_bytes": cpu_moe,
    }

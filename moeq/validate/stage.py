"""The validate stage: check a quant of the ladder against its source and plan its memory.

Reads the QuantizeRecord (the hand-off from quantize), writes a ValidateRecord.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moeq.config import Pipeline, QuantSpec
from moeq.records import QuantizeRecord, ValidateRecord
from moeq.quantize.stage import quantize_record
from moeq.validate.checks import validate_file
from moeq.validate.plan import plan_file
from moeq.workspace import Workspace


def current_validation(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, numerics: str = "sample") -> ValidateRecord | None:
    """The validate record when it checked the quant's current file, against its source, the same way."""
    quantized = QuantizeRecord.load(ws.record_path("quantize", quant.type))
    record = ValidateRecord.load(ws.record_path("validate", quant.type))
    if quantized is None or record is None:
        return None
    same = (record.file.sha256 == quantized.output.sha256 and record.source.sha256 == quantized.source.sha256
            and record.numerics == numerics and sorted(int(c) for c in record.plan["kv_bytes"]) == sorted(pipeline.bench.ctx))
    return record if same else None


@dataclasses.dataclass
class ValidateOutcome:
    record: ValidateRecord
    skipped: bool


def validate_quant(pipeline: Pipeline, quant: QuantSpec, ws: Workspace, numerics: str = "sample",
                   force: bool = False) -> ValidateOutcome:
    """Check the quant's file against its source and plan its memory; skip when the record is current."""
    current = None if force else current_validation(pipeline, quant, ws, numerics)
    if current is not None:
        return ValidateOutcome(current, skipped=True)
    quantized = quantize_record(pipeline, quant, ws)
    overrides = dict(quant.tensor_types)
    if quant.output_tensor_type:
        overrides[r"^output\.weight$"] = quant.output_tensor_type
    if quant.token_embedding_type:
        overrides[r"^token_embd\.weight$"] = quant.token_embedding_type
    report = validate_file(Path(quantized.output.path), Path(quantized.source.path), numerics,
                           quant=quant.type, overrides=overrides)
    plan = plan_file(Path(quantized.output.path), ctx_sizes=list(pipeline.bench.ctx))
    record = ValidateRecord(
        quant=quant.type, file=quantized.output, source=quantized.source, numerics=numerics, ok=report.ok,
        checks=[dataclasses.asdict(c) for c in report.checks], worst_tensors=report.worst_tensors,
        plan=plan.as_dict(),
    )
    record.save(ws.record_path("validate", quant.type))
    return ValidateOutcome(record, skipped=False)

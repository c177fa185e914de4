"""The validate stage: check a quant of the ladder against its source and plan its memory.

It receives the QuantizeRecord (the hand-off from quantize) and writes a ValidateRecord. Its key is
the file's and the source's sha256, the numerics mode, the context sizes of the plan and the type
overrides the type-mix check expects.

    result = run_stage(validate_stage(pipeline, pipeline.quant("Q8_0"), quantized), records)
    result.record.ok, result.record.plan.n_layer
"""

from __future__ import annotations

from pathlib import Path

from moeq.config import Pipeline, QuantSpec
from moeq.memory_plan import plan_file
from moeq.records import QuantizeRecord, ValidateRecord, WorstTensor
from moeq.stage_runner import Stage
from moeq.validate.checks import validate_file


def validate_stage(pipeline: Pipeline, quant: QuantSpec, quantized: QuantizeRecord,
                   numerics: str = "sample") -> Stage[ValidateRecord]:
    overrides = dict(quant.tensor_types)
    if quant.output_tensor_type:
        overrides[r"^output\.weight$"] = quant.output_tensor_type
    if quant.token_embedding_type:
        overrides[r"^token_embd\.weight$"] = quant.token_embedding_type
    ctx = list(pipeline.bench.ctx)

    def key() -> dict:
        return {"file_sha256": quantized.output.sha256, "source_sha256": quantized.source.sha256,
                "numerics": numerics, "ctx": sorted(ctx), "overrides": overrides}

    def run() -> ValidateRecord:
        report = validate_file(Path(quantized.output.path), Path(quantized.source.path), numerics,
                               quant=quant.type, overrides=overrides)
        plan = plan_file(Path(quantized.output.path), ctx_sizes=ctx)
        plan.file = Path(plan.file).name  # the record's `file` says where it is, workspace-relative
        return ValidateRecord(
            quant=quant.type, file=quantized.output, source=quantized.source, numerics=numerics, ok=report.ok,
            checks=report.checks, worst_tensors=[WorstTensor(**w) for w in report.worst_tensors], plan=plan,
        )

    return Stage("validate", quant.type, key=key, run=run)

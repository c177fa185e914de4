"""The validate stage: check a quant of the ladder against its source and plan its memory.

It receives the QuantizeRecord (the hand-off from quantize) and writes a ValidateRecord. Its key is
the file's and the source's sha256, the numerics mode, the context sizes of the plan and what the type-mix
check expects: each tensor's type as `llama-quantize --dry-run` of the source gives it with the record's type
flags (--pure, --tensor-type, a recipe file, the end flags) and importance matrix, for any type of the ladder.

    result = run_stage(validate_stage(pipeline, pipeline.quant("Q8_0"), quantized), records)
    result.record.ok, result.record.plan.n_layer
"""

from __future__ import annotations

from pathlib import Path

from moeq.config import Pipeline, QuantSpec
from moeq.memory_plan import plan_file
from moeq.quant_types import mixture
from moeq.recipe_file import read_recipe
from moeq.records import QuantizeRecord, ValidateRecord, WorstTensor
from moeq.stage_runner import Stage
from moeq.toolchain import Toolchain
from moeq.validate.checks import validate_file


CHECKS = 4  # raised when validate checks more: a record made before is checked again (2: the chat template;
# 3: the sampling defaults and the conversation rendered, for the card's chat request; 4: every type's mixture
# from llama-quantize --dry-run)


def validate_stage(pipeline: Pipeline, quant: QuantSpec, quantized: QuantizeRecord,
                   numerics: str = "sample", chain: Toolchain | None = None) -> Stage[ValidateRecord]:
    """`chain`: the tools, whose llama-quantize --dry-run of the source says each tensor's type (without it, the
    tables of typemix.py, which cover Q8_0, Q4_K_M and Q2_K, and general.file_type for the other types)."""
    options = quantized.options  # what llama-quantize was asked for: the type mix expected of each tensor
    overrides = dict(options.tensor_types)
    if options.tensor_type_file is not None:
        recipe = Path(options.tensor_type_file.path)
        overrides.update((p, t) for p, t in read_recipe(recipe) if p not in overrides)
    ends = {name: ggml_type for name, ggml_type in (("output.weight", options.output_tensor_type),
                                                    ("token_embd.weight", options.token_embedding_type)) if ggml_type}
    ctx = list(pipeline.bench.ctx)
    tool = chain.tool("llama-quantize") if chain is not None else None

    def key() -> dict:
        return {"file_sha256": quantized.output.sha256, "source_sha256": quantized.source.sha256,
                "numerics": numerics, "ctx": sorted(ctx), "overrides": overrides, "ends": ends,
                "pure": options.pure, "checks": CHECKS, "dry_run": tool.build.commit if tool else None}

    def run() -> ValidateRecord:
        expected = None
        if tool is not None:
            before, after = options.type_flags()  # and the matrix: some types' mixture depends on having one
            matrix = ["--imatrix", str(Path(options.imatrix.path).resolve())] if options.imatrix else []
            expected = mixture(tool.path, Path(quantized.source.path), options.type, [*before, *matrix, *after]).types
        report = validate_file(Path(quantized.output.path), Path(quantized.source.path), numerics,
                               quant=quant.type, overrides=overrides, ends=ends, pure=options.pure,
                               expected=expected)
        plan = plan_file(Path(quantized.output.path), ctx_sizes=ctx)
        plan.file = Path(plan.file).name  # the record's `file` says where it is, workspace-relative
        return ValidateRecord(
            quant=quant.type, file=quantized.output, source=quantized.source, numerics=numerics, ok=report.ok,
            checks=report.checks, worst_tensors=[WorstTensor(**w) for w in report.worst_tensors], plan=plan,
            prompt=report.prompt, sampling=report.sampling,
        )

    return Stage("validate", quant.type, key=key, run=run)

"""The facts of how the file was made: the model, the llama-quantize command and type mix, the log flush (partials/log-flush.md.j2)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from moeq.cards.facts.shared import LLAMA_CPP_REPO, hub_url
from moeq.manifest import Manifest, ModelCardSpec
from moeq.records import FetchRecord, QuantizeRecord
from moeq.records import ModelFacts as RecordedModel
from moeq.units import binary_size, decimal_size, short_count


@dataclass(frozen=True)
class ModelFacts:
    name: str
    base_model: str
    base_model_url: str
    license: str
    quantized_by: str
    architecture: str | None
    parameters: str
    parameters_exact: str
    blocks: int | None
    experts: int | None
    experts_used: int | None
    context_length: int | None
    expert_tensors: list[str]
    shared_experts: list[str]


@dataclass(frozen=True)
class Toolchain:
    version: str
    commit: str
    log_flush: str | None
    commit_url: str


@dataclass(frozen=True)
class SourceFile:
    file: str
    sha256: str
    size: str
    origin: str | None
    kind: str | None


@dataclass(frozen=True)
class TypeMixRow:
    type: str
    tensors: int
    size: str


@dataclass(frozen=True)
class QuantizationFacts:
    command: str
    llama_cpp: Toolchain
    overrides: list[str]
    source: SourceFile
    output_sha256: str
    type_mix: list[TypeMixRow]
    tensors: int


def model_facts(spec: ModelCardSpec, model: RecordedModel) -> ModelFacts:
    return ModelFacts(**{
        "name": spec.name,
        "base_model": spec.base_model,
        "base_model_url": hub_url(spec.base_model),
        "license": spec.license,
        "quantized_by": spec.quantized_by,
        "architecture": model.architecture,
        "parameters": short_count(model.parameters),
        "parameters_exact": f"{model.parameters:,}",
        "blocks": model.block_count,
        "experts": model.expert_count,
        "experts_used": model.expert_used_count,
        "context_length": model.context_length,
        "expert_tensors": model.expert_tensors,
        "shared_experts": model.shared_experts,
    })


def quantization_facts(quantized: QuantizeRecord, source: FetchRecord | None) -> QuantizationFacts:
    tool = quantized.tool
    options = quantized.options
    return QuantizationFacts(
        command=shlex.join(["llama-quantize", *quantized.command[1:]]),
        llama_cpp=Toolchain(version=tool.version, commit=tool.commit, log_flush=tool.log_flush,
                            commit_url=f"{LLAMA_CPP_REPO}/commit/{tool.commit}"),
        overrides=[f"{k}={v}" for k, v in options.tensor_types.items()]
        + ([f"output={options.output_tensor_type}"] if options.output_tensor_type else [])
        + ([f"token_embd={options.token_embedding_type}"] if options.token_embedding_type else []),
        source=SourceFile(file=quantized.source.path, sha256=quantized.source.sha256,
                          size=decimal_size(quantized.source.size),
                          origin=source.origin if source else None, kind=source.kind if source else None),
        output_sha256=quantized.output.sha256,
        type_mix=[TypeMixRow(share.type, share.tensors, binary_size(share.bytes)) for share in quantized.type_shares],
        tensors=len(quantized.tensors),
    )


def log_flush_facts(manifest: Manifest) -> str | None:
    """How many of the llama.cpp runs behind the records had moeq's log flush at exit: "all", "some" or None."""
    tools = [record.tool for entry in manifest.quants
             for record in (entry.records.imatrix, entry.records.choice, entry.records.recipe, entry.records.quantize,
                            entry.records.bench) if record is not None]
    flushed = sum(tool.log_flush is not None for tool in tools)
    return "all" if flushed == len(tools) else ("some" if flushed else None)

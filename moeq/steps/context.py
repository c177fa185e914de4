"""What one command works with, made once: the pipeline, its workspace and records, the tools, the Hub.

    ctx = Context.of(load_pipeline(Path("examples/tiny-phimoe.yaml")))
    ctx.records.get(QuantizeRecord, "Q8_0")
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

from moeq.config import IMATRIX_AUTO, Pipeline, QuantSpec
from moeq.hub.client import hub_api
from moeq.record_store import Records
from moeq.toolchain import Toolchain
from moeq.workspace import Workspace


@dataclass
class Context:
    pipeline: Pipeline
    ws: Workspace
    records: Records
    say: Callable[[str], None] = lambda _msg: None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, pipeline: Pipeline, say: Callable[[str], None] = lambda _msg: None) -> "Context":
        ws = Workspace(pipeline.workspace)
        return cls(pipeline, ws, Records(ws, pipeline.path), say)

    @functools.cached_property
    def chain(self) -> Toolchain:
        return self.pipeline.toolchain.chain()

    @functools.cached_property
    def api(self):
        return hub_api(on_message=self.say)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.say(f"warning: {message}")


def tools_needed(pipeline: Pipeline, quants: list[QuantSpec], *, skip_bench: bool = False) -> list[str]:
    """The llama.cpp tools the stages `moeq build` will run for `quants` call, in the order they run."""
    needed = []
    if pipeline.source.kind == "gguf":
        needed.append("llama-gguf-split")  # a split source is merged
    if any(q.imatrix == IMATRIX_AUTO for q in quants):
        needed.append("llama-imatrix")
    needed.append("llama-quantize")
    if not skip_bench:
        needed += ["llama-bench", "llama-completion"]
        if pipeline.bench.quality:
            needed.append("llama-perplexity")
        if pipeline.bench.rpc == "local":
            needed.append("ggml-rpc-server")
    needed.append("llama-gguf-split")  # shards
    return list(dict.fromkeys(needed))


def require_tools(ctx: Context, quants: list[QuantSpec], *, skip_bench: bool = False) -> None:
    """Find every tool the build will need before any stage runs (a ToolError names the first one missing or of
    the wrong backend): a CUDA pipeline without CUDA tools stops before downloading 84 GB, not at the imatrix."""
    for name in tools_needed(ctx.pipeline, quants, skip_bench=skip_bench):
        ctx.chain.tool(name)

"""`moeq doctor`: is this machine ready to run the pipeline?

Checks the llama.cpp tools and the backend they were built with against the GPUs present, the
Python packages, the Hub login (present or not, never its value) and, given a pipeline, the free
disk against what the pipeline will write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata

from moeq import quant_types
from moeq.config import Pipeline
from moeq.errors import ToolError
from moeq.gpus import nvidia_gpus
from moeq.synth import parameter_count
from moeq.toolchain import PINNED_COMMIT, TOOLS, Toolchain
from moeq.workspace import disk_needed, free_bytes

PACKAGES = ("moeq", "gguf", "huggingface_hub", "typer", "rich", "jinja2", "pyyaml", "numpy", "markdown-it-py", "pydantic",
            "torch", "transformers", "sentencepiece", "safetensors")  # the last four: the convert extra


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    path: str = ""
    commit: str = ""
    backend: str = ""


@dataclass
class DiskPlan:
    workspace: str
    free_bytes: int
    needed_bytes: int | None
    items: list[tuple[str, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.needed_bytes is None or self.free_bytes >= self.needed_bytes


@dataclass
class DoctorReport:
    tools: list[Check]
    packages: dict[str, str]
    hub_token_present: bool
    hub_endpoint: str
    gpus: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pipeline: str | None = None
    disk: DiskPlan | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.tools) and (self.disk is None or self.disk.ok)

    def as_dict(self) -> dict:
        out = {
            "ok": self.ok,
            "tools": [vars(c) for c in self.tools],
            "packages": self.packages,
            "hub": {"token_present": self.hub_token_present, "endpoint": self.hub_endpoint},
            "gpus": self.gpus,
            "warnings": self.warnings,
            "pipeline": self.pipeline,
        }
        if self.disk is not None:
            out["disk"] = {**vars(self.disk), "ok": self.disk.ok,
                           "items": [{"what": w, "bytes": b} for w, b in self.disk.items]}
        return out


def check_tools(chain: Toolchain) -> list[Check]:
    checks = []
    for name in TOOLS:
        try:
            tool = chain.tool(name)
        except ToolError as exc:
            checks.append(Check(name, False, str(exc)))
            continue
        detail = f"OK ({tool.build.version}, via {tool.found_via})"
        if not tool.build.pinned:
            detail += f"; note: not the pinned commit {PINNED_COMMIT}"
        checks.append(Check(name, True, detail, str(tool.path), tool.build.commit, tool.build.backend))
    return checks


def backend_warnings(tools: list[Check], gpus: list[dict]) -> list[str]:
    """A GPU the tools cannot use, or GPU tools without a GPU: the bench's offload modes would not measure it."""
    backends = {c.backend for c in tools if c.ok}
    if gpus and backends == {"cpu"}:
        names = ", ".join(sorted({g["name"] for g in gpus}))
        return [f"this machine has an NVIDIA GPU ({names}) but the llama.cpp tools are a CPU build, so the "
                "bench cannot measure GPU offload: build the CUDA tools with scripts/setup --backend cuda "
                "(and set toolchain.backend: cuda in the pipeline)"]
    if not gpus and "cuda" in backends:
        return ["the llama.cpp tools are a CUDA build but nvidia-smi lists no NVIDIA GPU: the bench's offload "
                "modes will find no device; check the driver (nvidia-smi)"]
    return []


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def hub_status() -> tuple[bool, str]:
    from huggingface_hub import constants, get_token

    return get_token() is not None, constants.ENDPOINT


def plan_disk(pipeline: Pipeline) -> DiskPlan:
    """Bytes the pipeline will write: the F16 source (and its download) plus every quant."""
    free = free_bytes(pipeline.workspace)
    if pipeline.source.kind == "synth":
        params: int | None = parameter_count(pipeline.source.synth)
    else:
        params = pipeline.model.parameters
    if params is None:
        return DiskPlan(str(pipeline.workspace), free, None)
    items = [("F16 source (GGUF)", params * 2)]
    if pipeline.source.kind == "hf":
        items.append(("safetensors download", params * 2))
    for quant in pipeline.quants:
        bpw = quant_types.QUANT_TYPES[quant.type].approx_bpw
        items.append((quant.file, int(params * bpw / 8)))
    needed = disk_needed(sum(b for _, b in items))
    return DiskPlan(str(pipeline.workspace), free, needed, items)


def run_doctor(chain: Toolchain, pipeline: Pipeline | None = None) -> DoctorReport:
    token_present, endpoint = hub_status()
    tools, gpus = check_tools(chain), nvidia_gpus()
    return DoctorReport(
        tools=tools,
        packages=package_versions(),
        hub_token_present=token_present,
        hub_endpoint=endpoint,
        gpus=gpus,
        warnings=backend_warnings(tools, gpus),
        pipeline=str(pipeline.path) if pipeline else None,
        disk=plan_disk(pipeline) if pipeline else None,
    )

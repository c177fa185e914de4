"""`moeq doctor`: is this machine ready to run the pipeline?

Checks the llama.cpp tools and the backend they were built with against the GPUs present, the
Python packages, the Hub login (present or not, never its value) and, given a pipeline, the free
disk against what the pipeline will write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from gguf import Keys

from moeq import quant_types
from moeq.config import RECIPE_SEARCH, Pipeline
from moeq.errors import MoeqError, ToolError
from moeq.gguf_header import SPLIT_NAME_RE, read_header
from moeq.hub.client import write_access
from moeq.recipe_file import FILLER, SEARCH_TYPES, neighbours, type_bits
from moeq.runner import LOG_FLUSH_LIBRARY, logs_through_common
from moeq.gpus import nvidia_gpus
from moeq.synth import parameter_count
from moeq.toolchain import PINNED_COMMIT, TOOLS, Toolchain
from moeq.workspace import Workspace, disk_needed, free_bytes

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
    log_flush: str | None = None  # sha256 of moeq's log flush at exit preloaded into it


@dataclass
class DiskPlan:
    workspace: str
    free_bytes: int
    needed_bytes: int | None  # the peak with the workspace's margin (disk_needed)
    items: list[tuple[str, int]] = field(default_factory=list)
    peak_bytes: int | None = None  # the most the workspace holds at once, by the estimate
    refetch_bytes: int | None = None  # the peak of a later `moeq fetch --force`, beside everything made

    @property
    def ok(self) -> bool:
        return self.needed_bytes is None or self.free_bytes >= self.needed_bytes


@dataclass
class HubAccess:
    """Whether the token may write to a namespace the pipeline pushes to, as the Hub says (whoami)."""

    namespace: str
    ok: bool
    detail: str


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
    hub_access: list[HubAccess] = field(default_factory=list)
    hub_required: bool = False  # the pipeline pushes (hub.push), or a release job was named (--job): it must write

    @property
    def ok(self) -> bool:
        return (all(c.ok for c in self.tools) and (self.disk is None or self.disk.ok)
                and (not self.hub_required or all(a.ok for a in self.hub_access)))

    def problems(self) -> list[str]:
        """What is not in order, by name: the tools, the disk, the Hub namespaces the token may not write to."""
        found = [c.name for c in self.tools if not c.ok]
        if self.disk is not None and not self.disk.ok:
            found.append("disk space")
        if self.hub_required:
            found += [f"writing to {a.namespace} on the Hub" for a in self.hub_access if not a.ok]
        return found

    def as_dict(self) -> dict:
        out = {
            "ok": self.ok,
            "tools": [vars(c) for c in self.tools],
            "packages": self.packages,
            "hub": {"token_present": self.hub_token_present, "endpoint": self.hub_endpoint,
                    "required": self.hub_required, "access": [vars(a) for a in self.hub_access]},
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
        detail = f"OK ({tool.build.version}, via {tool.found_via}: {tool.build.describe()})"
        if not tool.build.pinned:
            detail += f"; note: not the pinned commit {PINNED_COMMIT}"
        if logs_through_common(name) and not tool.build.log_flush:
            detail += (f"; note: without moeq's log flush at exit ({LOG_FLUSH_LIBRARY} beside it, which "
                       "scripts/build-llama-cpp builds), it can exit before its last lines are written, and moeq "
                       "then stops with an error")
        checks.append(Check(name, True, detail, str(tool.path), tool.build.commit, tool.build.backend,
                            tool.build.log_flush))
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


IMATRIX_JOB = "imatrix"  # `doctor --job imatrix`: the release's imatrix job, which builds no quant


def plan_disk(pipeline: Pipeline, jobs: list[str] | None = None) -> DiskPlan:
    """The most the workspace holds at once: the fetch (a download beside the F16 it converts to, deleted after),
    or the F16 (unless a local file, used in place) with every quant, its shards when split, the F16 logits for
    KL divergence and the choice's second candidate of the largest quant with an importance matrix (the chosen one
    becomes the quant; the other is deleted once measured), and a recipe search's per-type files and candidates.
    A later `fetch --force` downloads beside everything:
    reported, not required. `jobs`: one job of a release across machines (its quants, or IMATRIX_JOB: the F16
    and the importance matrix alone); None: the whole ladder on this machine."""
    free = free_bytes(pipeline.workspace)
    selected = pipeline.quants if jobs is None else tuple(pipeline.quant(j) for j in jobs if j != IMATRIX_JOB)
    params, n_layer, vocab = _source_shape(pipeline)
    if params is None:
        return DiskPlan(str(pipeline.workspace), free, None)
    f16 = params * 2
    kind = pipeline.source.kind
    download = f16 if kind in ("hf", "gguf") else 0  # safetensors, or the GGUF (shards, merged beside)
    if kind == "local":  # used in place: it takes no more room
        f16 = 0
    items = [("F16 source (GGUF)", f16)] if f16 else []
    if kind == "hf":
        items.append(("safetensors download (deleted once converted)", download))
    quants = {q.type: quant_types.estimated_bytes(q.type, params, n_layer) for q in selected}
    items += [(q.file, quants[q.type]) for q in selected]
    split = sum(size for size in quants.values() if size > pipeline.hub.max_shard_size)
    if split:
        items.append(("shards of the quants over hub.max_shard_size", split))
    candidate = max((quants[q.type] for q in selected if q.imatrix is not None), default=0) \
        if pipeline.bench.quality else 0
    if candidate:
        items.append(("the choice's candidate not published, of the largest quant with an importance matrix "
                      "(while it is measured)", candidate))
    searched = [q for q in selected if q.recipe == RECIPE_SEARCH] if pipeline.bench.quality else []
    search = 0
    if searched:
        groups = {q.imatrix is None for q in searched}  # the rungs of one importance matrix share their files
        layers = n_layer or 32  # a many-layer model's mixture when the layer count is not known yet
        pure = sum(int(params * per_type_file_bits([q.type for q in searched if (q.imatrix is None) == g], layers,
                                                   imatrix=not g) / 8)
                   for g in groups)
        whole = int(params * max(per_type_file_bits([q.type], layers, t, q.imatrix is not None)
                                 for q in searched for t in SEARCH_TYPES) / 8)
        searched = [quants[q.type] for q in searched]
        items += [("the recipe search's per-type files (kept for the next search)", pure),
                  ("the per-type file being made (llama-quantize writes it whole, moeq keeps what the search needs)",
                   whole),
                  ("the recipe search's assembled candidate and searched file (while it runs)", 2 * max(searched))]
        search = pure + whole + 2 * max(searched)
    logits = 0
    if pipeline.bench.quality and vocab and selected:  # llama-perplexity keeps each chunk's 2nd half, uint16 a token
        ppl = pipeline.bench.perplexity
        logits = ppl.chunks * (ppl.ctx // 2) * (vocab + 4) * 2
        items.append(("F16 logits saved for the KL divergence", logits))
    made = f16 + sum(quants.values()) + split + logits
    fetch_peak = f16 + download if kind == "hf" or _split_gguf(pipeline) else f16
    peak = max(fetch_peak, made + candidate + search)
    return DiskPlan(str(pipeline.workspace), free, disk_needed(peak), items, peak_bytes=peak,
                    refetch_bytes=made + f16 + download if download else None)


# llama.cpp's mixture for the expert tensors, most of a MoE's weights, of each rung a search types but IQ3_XS
# (llama-quant.cpp's llama_tensor_get_type_impl; tests/test_recipe_search.py checks both against llama-quantize
# --dry-run): the type of ffn_gate_exps and ffn_up_exps, and of a layer's ffn_down_exps. IQ3_XS, which mixes two
# types in gate and up, is counted at its base type.
GATE_UP_TYPES = {"Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
                 "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
                 "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS",
                 "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S", "IQ4_XS": "IQ4_XS"}
# ffn_down_exps in the first eighth of the layers, where the rung gives it more bits than the rest
FIRST_EIGHTH_DOWN = {"IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ2_S": "IQ3_S",
                     "IQ2_M": "IQ3_S", "IQ3_XXS": "Q4_K", "IQ3_M": "Q4_K", "IQ4_XS": "Q5_K", "Q2_K_S": "Q4_K",
                     "Q4_K_S": "Q5_K"}


def gate_up_type(rung: str) -> str:
    return GATE_UP_TYPES.get(rung, quant_types.BASE_TENSOR_TYPE[rung])


def ffn_down_type(rung: str, layer: int, n_layer: int) -> str:
    more = quant_types.uses_more_bits(layer, n_layer)
    own = {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if layer < n_layer // 16 else "Q4_K", "Q4_K_M": "Q6_K" if more else "Q4_K",
           "Q5_K_M": "Q6_K" if more else "Q5_K", "Q3_K_L": "Q5_K"}.get(rung)
    if own is not None:
        return own
    if layer < n_layer // 8 and rung in FIRST_EIGHTH_DOWN:
        return FIRST_EIGHTH_DOWN[rung]
    return "Q3_K" if rung == "IQ3_XXS" else gate_up_type(rung)


def per_type_file_bits(rungs: list[str], n_layer: int, whole: str | None = None, imatrix: bool = True) -> float:
    """Bits per weight of the per-type files the searches of `rungs` share, from the expert tensors (most of the
    weights: gate and up two thirds, down one third): each may take its stock type in every rung and the next type
    either side, K or IQ (for Phi-3.5-MoE with an importance matrix 47.5 GB for Q2_K, 123.9 GB for Q4_K_M and
    Q2_K, where `moeq recipe --plan` counts 48.0 and 123.6 from the header). With `whole`, that type's file as
    llama-quantize writes it, before moeq drops what no search needs (written as the filler type)."""
    def near(ggml_type: str) -> set[str]:
        return set(neighbours(ggml_type, imatrix).values())

    gate_up = {n for r in rungs for n in near(gate_up_type(r))}
    downs = [{n for r in rungs for n in near(ffn_down_type(r, i, n_layer))} for i in range(n_layer)]
    if whole is not None:
        def held(needed: set[str]) -> float:
            return type_bits(whole if whole in needed else FILLER)
        return 2 / 3 * held(gate_up) + sum(held(down) for down in downs) / (3 * n_layer)
    return 2 / 3 * sum(map(type_bits, gate_up)) + sum(sum(map(type_bits, down)) for down in downs) / (3 * n_layer)


def _split_gguf(pipeline: Pipeline) -> bool:
    return pipeline.source.kind == "gguf" and bool(SPLIT_NAME_RE.match(Path(pipeline.source.file or "").name))


def _source_shape(pipeline: Pipeline) -> tuple[int | None, int | None, int | None]:
    """(parameters, layers, vocabulary): the synth spec's, else the F16 source's header once fetched, else
    model.parameters alone (the quants' sizes are then those of a many-layer model)."""
    spec = pipeline.source
    if spec.kind == "synth":
        return parameter_count(spec.synth), spec.synth.layers, spec.synth.vocab
    path = Path(spec.path) if spec.kind == "local" else Workspace(pipeline.workspace).source_path(
        pipeline.model.file_stem)
    try:
        header = read_header(path)
    except (OSError, MoeqError):
        return pipeline.model.parameters, None, None
    layers = header.arch_value(Keys.LLM.BLOCK_COUNT)
    vocab = next((t.shape[1] for t in header.tensors if t.name == "token_embd.weight" and len(t.shape) == 2), None)
    return (sum(t.n_elements for t in header.tensors), layers if isinstance(layers, int) else None,
            vocab if isinstance(vocab, int) else None)


def hub_access(pipeline: Pipeline, jobs: list[str] | None) -> list[HubAccess]:
    """For each namespace the quants of `jobs` (all without) are pushed to, whether the token may write there; the
    imatrix job pushes nothing."""
    selected = pipeline.quants if jobs is None else [pipeline.quant(j) for j in jobs if j != IMATRIX_JOB]
    namespaces = sorted({pipeline.repo_id(q).split("/")[0] for q in selected})
    return [HubAccess(namespace, *write_access(namespace)) for namespace in namespaces]


def run_doctor(chain: Toolchain, pipeline: Pipeline | None = None, jobs: list[str] | None = None) -> DoctorReport:
    token_present, endpoint = hub_status()
    tools, gpus = check_tools(chain), nvidia_gpus()
    access = hub_access(pipeline, jobs) if pipeline else []
    return DoctorReport(
        tools=tools,
        packages=package_versions(),
        hub_token_present=token_present,
        hub_endpoint=endpoint,
        gpus=gpus,
        warnings=backend_warnings(tools, gpus),
        pipeline=str(pipeline.path) if pipeline else None,
        disk=plan_disk(pipeline, jobs) if pipeline else None,
        hub_access=access,
        hub_required=bool(pipeline) and bool(access) and (pipeline.hub.push or jobs is not None),
    )

"""The pipeline's parts as typed values: what pipeline.yaml holds once load.py has read and checked it.

Each section of pipeline.yaml is one frozen dataclass below; its fields are the section's keys (`keys_of`)
and their defaults are the section's defaults, written once here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from moeq.errors import ConfigError
from moeq.toolchain import Toolchain

SOURCE_KINDS = ("hf", "gguf", "local", "synth")
SYNTH_ARCHS = ("phimoe", "qwen3moe", "llama-moe", "qwen2moe")  # moeq/synth.py's ARCHS
REPO_TEMPLATE_FIELDS = {"namespace", "model", "quant", "quant_slug", "quant_lower", "file_stem"}
# The Hub's usual name for one quant's repo (GGUF-my-repo's): <Model>-<QUANT>-GGUF, from the pipeline's model.
DEFAULT_REPO_TEMPLATE = "{namespace}/{model}-{quant}-GGUF"
# One repo for the whole ladder (bartowski's and mradermacher's layout, what llama.cpp's -hf REPO:QUANT expects).
DEFAULT_SINGLE_REPO = "{namespace}/{model}-GGUF"


class Layout(StrEnum):
    """hub.layout: the ladder in one repo (single), or a repo per quant (per-quant)."""

    SINGLE = "single"
    PER_QUANT = "per-quant"
DEFAULT_FILE_TEMPLATE = "{file_stem}-{quant}.gguf"
MAX_PIPELINE_BYTES = 1 << 20  # a pipeline file is a few KB; this bounds what is read
MAX_EXTRA_VALUES = 10_000  # card.extra, after YAML aliases are expanded
UNQUANTIZED = ("F16", "BF16", "F32", "COPY")
MAX_CTX = 1 << 24  # tokens: far above any model's context
MAX_TIMEOUT_S = 7 * 24 * 3600  # one tool run may take a week at most
SYNTH_MAX = {"layers": 256, "experts": 512, "experts_used": 512, "embd": 65_536, "ff": 262_144, "heads": 1024,
             "kv_heads": 1024, "vocab": 1 << 20}


# ---------------------------------------------------------------- typed pipeline


@dataclass(frozen=True)
class ModelSpec:
    name: str
    base_model: str
    license: str
    languages: tuple[str, ...]
    quantized_by: str
    file_stem: str
    parameters: int | None = None  # total parameter count, for disk-space estimates


@dataclass(frozen=True)
class SynthSpec:
    layers: int = 2
    experts: int = 4
    experts_used: int = 2
    embd: int = 256
    ff: int = 512
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    seed: int = 0


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    repo: str | None = None
    revision: str | None = None
    file: str | None = None
    path: Path | None = None
    synth: SynthSpec | None = None
    train: bool = False  # synth: train the checkpoint (synth_train) and convert it, instead of random weights
    arch: str = "phimoe"  # synth: which architecture's tiny model (moeq/synth.py, ARCHS)


IMATRIX_AUTO = "auto"  # quants[].imatrix: the imatrix stage's output
MAX_COMPARED = 16  # compare: entries; each is a download and a measurement


@dataclass(frozen=True)
class CompareSpec:
    """compare[]: a GGUF of the same model published elsewhere on the Hub, measured beside the ladder."""

    repo: str
    file: str  # the GGUF, or a split file's first shard
    revision: str | None = None  # None: main when it is fetched (the commit is recorded)
    label: str | None = None  # what the card calls it (default: the file's name)

    @property
    def id(self) -> str:
        """What names its record (records/compare-ID.json) and its download folder: readable, unique per file."""
        text = f"{self.repo}/{self.file.removesuffix('.gguf')}"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--"))
        return slug if len(slug) <= 80 else f"{slug[:67]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class QuantSpec:
    type: str
    imatrix: Path | str | None = None  # IMATRIX_AUTO, a file, or None (none)
    tensor_types: tuple[tuple[str, str], ...] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    file: str = ""  # output file name inside the workspace
    recipe: str | None = None  # RECIPE_SEARCH: per-tensor types searched on measured KL divergence
    budget: "Budget | None" = None  # what a searched recipe may weigh (None with recipe: search: the stock file)
    # --pure: every tensor the base type, but for tensor_type_file's and the two end flags (moeq's searched recipe)
    pure: bool = dataclasses.field(default=False, metadata={"internal": True})
    # --tensor-type-file: REGEX=TYPE items, the first that matches wins (quants[].recipe: PATH, or the search's)
    tensor_type_file: Path | None = dataclasses.field(default=None, metadata={"internal": True})

    @property
    def slug(self) -> str:
        return self.type.lower().replace("_", "-")

    @property
    def label(self) -> str:
        """The searched file's quant label: TYPE_MOEQ (Q2_K_MOEQ). llama.cpp's `-hf REPO:LABEL` takes the first file
        whose name holds LABEL then `.` or `-`, so Q2_K does not pick it, and the Hub reads the label whole."""
        return self.type + SEARCHED_SUFFIX

    @property
    def searched_file(self) -> str:
        """The searched file's name: the stock file's, its quant type labelled (tiny-phimoe-Q2_K_MOEQ.gguf)."""
        stem = self.file.removesuffix(".gguf")
        at = stem.upper().rfind(self.type.upper())
        if at >= 0 and stem[at + len(self.type):at + len(self.type) + 1] in ("", ".", "-"):
            stem = stem[:at + len(self.type)] + SEARCHED_SUFFIX + stem[at + len(self.type):]
        else:
            stem = f"{stem}-{self.label}"
        return stem + ".gguf"


SEARCHED_SUFFIX = "_MOEQ"


RECIPE_SEARCH = "search"


class BudgetKind(StrEnum):
    """What bounds a searched recipe: the stock file's size, bits per weight, bytes, or a GPU's memory."""

    STOCK = "stock"
    BPW = "bpw"
    BYTES = "bytes"
    GPU = "gpu"
BUDGET_PLACEMENTS = {"cpu-moe": "every expert in system RAM", "gpu": "every layer on the GPU"}


@dataclass(frozen=True)
class Budget:
    """The most a searched recipe may weigh: its tensors no more than the stock file's (stock), bits per weight over
    every tensor (bpw), or bytes; or (gpu) what sits on the GPU under `placement` (the weights there, the KV
    cache at `ctx` and the compute allowance, as moeq's memory plan counts them) no more than `value` bytes, the
    tensors no more than the stock file's."""

    kind: BudgetKind = BudgetKind.STOCK
    value: float = 0.0
    placement: str = ""  # gpu: a key of BUDGET_PLACEMENTS
    ctx: int = 0  # gpu: the context the KV cache is counted at

    def describe(self) -> str:
        if self.kind == BudgetKind.GPU:
            return (f"{self.value / 2**30:g} GiB of GPU memory with {self.placement} at context {self.ctx:,}, "
                    "no larger than the stock file")
        return {BudgetKind.STOCK: "no larger than the stock file", BudgetKind.BPW: f"{self.value:g} bits per weight",
                BudgetKind.BYTES: f"{int(self.value):,} bytes"}[self.kind]


@dataclass(frozen=True)
class RecipeSpec:
    selection: Path | None = None  # None: the selection text shipped with moeq (moeq/data/SELECTION-TEXT.md)
    ctx: int = 512
    chunks: int = 16
    layers_per_group: int | None = None  # None: a band of layers per eighth of the model (one layer when small)
    max_evals: int = 100  # llama-perplexity runs a search may make


@dataclass(frozen=True)
class HubSpec:
    namespace: str
    layout: Layout = Layout.SINGLE
    repo: str = ""  # the single repo's id
    repo_template: str = DEFAULT_REPO_TEMPLATE
    private: bool = False
    create_pr: bool = False
    max_shard_size: int = 50_000_000_000
    push: bool = False


@dataclass(frozen=True)
class CardSpec:
    template: Path | None = None  # None: moeq's own templates/model-card.md.j2
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class PerplexitySpec:
    text: Path | None = None  # None: the evaluation text shipped with moeq
    ctx: int = 512
    chunks: int = 8


@dataclass(frozen=True)
class BenchSpec:
    modes: tuple[str, ...] = ("cpu", "gpu", "cpu-moe")  # plus integers N for -ncmoe N, as strings
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 3
    threads: int | None = None
    ctx: tuple[int, ...] = (4096,)
    timeout_s: int = 1800
    perplexity: PerplexitySpec = field(default_factory=PerplexitySpec)
    rpc: str | None = None  # HOST:PORT of a ggml-rpc-server, or "local" to start one on 127.0.0.1
    quality: bool = True  # llama-perplexity against F16; off for random weights, where it means nothing


@dataclass(frozen=True)
class ImatrixSpec:
    calibration: Path | None = None  # None: the calibration text shipped with moeq
    ctx: int = 512
    chunks: int | None = None  # None: every chunk of the text
    min_expert_tokens: int = 32
    require_coverage: bool = False
    format: str = "gguf"  # or "dat", llama.cpp's legacy format


@dataclass(frozen=True)
class ToolchainSpec:
    llama_cpp_bin: Path | None = None
    backend: str | None = None  # cpu, cuda, ...: every tool must be of that build (None: any)
    # llama-quantize prints a line per tensor; one of Phi-3.5-MoE's expert tensors (840 MB in F16) takes a minute or two
    # on two cores. This long a silence is a tool that spins (a stuck disk): it is stopped.
    quantize_silence_s: int = 600

    def chain(self, fresh: bool = False) -> Toolchain:
        """The llama.cpp tools this pipeline runs."""
        return Toolchain(self.llama_cpp_bin, fresh=fresh, backend=self.backend)


@dataclass(frozen=True)
class Pipeline:
    path: Path
    model: ModelSpec
    source: SourceSpec
    workspace: Path
    quants: tuple[QuantSpec, ...]
    hub: HubSpec
    card: CardSpec
    bench: BenchSpec
    toolchain: ToolchainSpec
    imatrix: ImatrixSpec = field(default_factory=ImatrixSpec)
    recipe: RecipeSpec = field(default_factory=RecipeSpec)
    compare: tuple[CompareSpec, ...] = ()

    def quant(self, name: str) -> QuantSpec:
        for q in self.quants:
            if q.type.lower() == name.lower():
                return q
        known = ", ".join(q.type for q in self.quants)
        raise ConfigError(self.path, f"quants: no quant {name!r} in the ladder", f"name one it configures: {known}")

    def repo_id(self, quant: QuantSpec) -> str:
        return render_repo_id(self.hub, self.model, quant)

    @property
    def single_repo(self) -> bool:
        return self.hub.layout == Layout.SINGLE


def render_repo_id(hub: HubSpec, model: ModelSpec, quant: QuantSpec) -> str:
    if hub.layout == Layout.SINGLE:
        return hub.repo
    return hub.repo_template.format(
        namespace=hub.namespace, model=repo_name(model.name), quant=quant.type, quant_slug=quant.slug,
        quant_lower=quant.type.lower(), file_stem=model.file_stem,
    )


def repo_name(text: str) -> str:
    """A model name as a Hub repo name: 'Phi 3.5 MoE (instruct)' -> 'Phi-3.5-MoE-instruct'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    name = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", name))
    return name.strip("-.") or "model"


def keys_of(spec: type, *, leave_out: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The keys a section of pipeline.yaml allows: its dataclass's fields, but those moeq sets itself (internal)."""
    return tuple(f.name for f in dataclasses.fields(spec) if f.name not in leave_out and not f.metadata.get("internal"))

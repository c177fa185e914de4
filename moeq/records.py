"""The records stages write and read: the only hand-off between stages.

Every record and every value nested in one is a pydantic model. Each field's docstring is its
description in the JSON Schema published beside every card (moeq-manifest.schema.json). Saving,
loading and caching them is record_store.py's job.

    records.get(QuantizeRecord, "Q8_0").output.sha256
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 2  # 2: every nested value typed, and the stage runner's key stored in the record


class Model(BaseModel):
    """A value of a record: unknown keys are refused, so a record of another shape is not half-read."""

    # JSON has no NaN: a figure is finite or absent. A field's docstring is its description in the JSON Schema.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)


class Record(Model):
    """A stage's result, saved as WORKSPACE/records/STAGE[-QUANT].json by the stage runner."""

    @classmethod
    def stage_name(cls) -> str:
        """The stage that writes it, which names its file: fetch, imatrix, quantize, ..."""
        return cls.model_fields["stage"].default


class FileRef(Model):
    path: str
    """Where the file is: relative to the workspace when inside it, else as the pipeline names it."""
    size: int
    """Its size in bytes."""
    sha256: str
    """The sha256 of its bytes, in hex."""


class ToolBuildRef(Model):
    """The llama.cpp build that ran a stage, as its `--version` printed it."""

    version: str
    """The version the tool printed."""
    build: str
    """llama.cpp's build number."""
    commit: str
    """The llama.cpp commit the tool was built from."""
    compiler: str
    """The compiler that built it."""
    target: str
    """The target it was built for (e.g. x86_64-linux-gnu)."""
    backend: str = "cpu"
    """The ggml offload backend it was built with (cpu, cuda, ...)."""
    log_flush: str | None = None
    """The sha256 of moeq's log flush at exit (scripts/llama-cpp/moeq-log-flush.cpp), preloaded into the tool so
    that it writes its whole log before it exits; it changes nothing the tool writes to its output files. None:
    the tool ran without it."""


# ---------------------------------------------------------------- source, quantize


class FetchRecord(Record):
    """The source every quant is made from, as the fetch stage made or found it."""

    stage: Literal["fetch"] = "fetch"
    """The stage that wrote it (a record or manifest written before the stage had this name says "source")."""
    kind: str
    """Where the source came from: synth, local, gguf (a GGUF on the Hub) or hf (a checkpoint converted)."""
    origin: str
    """repo@revision/file, a local path, or the synth options."""
    output: FileRef
    """The F16 GGUF every quant is made from."""
    options: dict[str, Any] = {}
    """The synth options; or the repo, revision, commit, file and the files fetched."""
    license: FileRef | None = None
    """The license file downloaded with a Hub checkpoint, kept to be published."""

    @field_validator("stage", mode="before")
    @classmethod
    def _earlier_name(cls, value: Any) -> Any:
        return "fetch" if value == "source" else value  # written before the stage was renamed


class TensorRow(Model):
    name: str
    """The tensor's GGUF name (blk.0.ffn_up_exps.weight)."""
    shape: list[int]
    """Its dimensions, as GGUF lists them."""
    type_before: str
    """Its type in the source."""
    type_after: str
    """Its type in the quant."""
    bytes_before: int
    """Its bytes in the source."""
    bytes_after: int
    """Its bytes in the quant."""


class ModelFacts(Model):
    """What later stages (cards) need to know of the model, read once from the source header."""

    architecture: str | None
    """general.architecture (phimoe, qwen3moe, ...)."""
    parameters: int
    """Parameters, counted from the tensors' shapes."""
    tensors: int
    """Tensors in the file."""
    block_count: int | None
    """Transformer layers."""
    expert_count: int | None
    """Routed experts per layer."""
    expert_used_count: int | None
    """Experts the router picks per token."""
    context_length: int | None
    """The context the model was trained for."""
    embedding_length: int | None
    """The hidden size."""
    head_count: int | None
    """Attention heads."""
    head_count_kv: int | None
    """Key/value heads (grouped-query attention)."""
    expert_tensors: list[str] = []
    """The routed experts' tensor kinds (ffn_up_exps, ...): what --cpu-moe moves to system RAM."""
    shared_experts: list[str] = []
    """The shared experts' tensor kinds (ffn_up_shexp, ...), which stay on the GPU."""


class ImatrixRef(Model):
    path: str
    """The importance matrix file llama-quantize read."""
    sha256: str
    """Its sha256."""


# ---------------------------------------------------------------- imatrix


class CalibrationSource(Model):
    title: str
    """The work a part of the calibration text comes from."""
    url: str
    """Where it is published."""
    license: str
    """Its license."""


class CalibrationRef(Model):
    name: str
    """The calibration file's name; moeq's own text when `shipped`."""
    size: int
    """Its size in bytes."""
    sha256: str
    """Its sha256."""
    shipped: bool
    """moeq's calibration text (moeq/data/CALIBRATION.md says what it holds), or the publisher's own."""
    sources: list[CalibrationSource] = []
    """What the shipped text is made of; a publisher's own text: none."""


class ExpertTokens(Model):
    layer: int
    """The layer."""
    expert: int
    """The expert within it."""
    tokens: int
    """Tokens the router sent to it."""


class ExpertCoverage(Model):
    """Tokens the router sent to each expert while llama-imatrix ran, from the imatrix GGUF's counts."""

    min_expert_tokens: int
    """The bar (imatrix.min_expert_tokens)."""
    tokens: dict[int, list[int]]
    """Layer -> tokens per expert."""
    under: list[ExpertTokens]
    """The experts under the bar, by layer and expert."""
    min: int
    """The fewest tokens any expert saw."""
    median: float
    """The median over every expert."""
    max: int
    """The most tokens any expert saw."""
    experts: int
    """Experts counted: layers x experts."""


class ImatrixRecord(Record):
    stage: Literal["imatrix"] = "imatrix"
    """The stage that wrote it."""
    source: FileRef
    """The F16 GGUF it was computed on."""
    calibration: CalibrationRef
    """The calibration text."""
    output: FileRef
    """The importance matrix file."""
    format: str
    """gguf, or dat (llama.cpp's legacy format)."""
    ctx: int
    """The context of each chunk, in tokens."""
    chunks: int
    """Chunks of the calibration text evaluated."""
    tokens: int
    """chunks x ctx: the tokens llama-imatrix evaluated."""
    tool: ToolBuildRef
    """The llama-imatrix that made it."""
    command: list[str]
    """The command line, as run."""
    coverage: ExpertCoverage
    """How many tokens each expert saw."""
    warnings: list[str] = []
    """What the card warns of (experts under the bar)."""


class QuantizeOptions(Model):
    """Everything that changes llama-quantize's output."""

    type: str
    """The quant type (Q8_0, Q4_K_M, ...)."""
    imatrix: ImatrixRef | None = None
    """The importance matrix it was made with, if any."""
    tensor_types: dict[str, str] = {}
    """--tensor-type overrides: pattern -> type."""
    output_tensor_type: str | None = None
    """--output-tensor-type, if given."""
    token_embedding_type: str | None = None
    """--token-embedding-type, if given."""
    allow_requantize: bool = False
    """--allow-requantize: the source was already quantized."""
    pure: bool = False
    """--pure: every tensor the type's base type, but for those tensor_type_file and the two end flags name."""
    tensor_type_file: FileRef | None = None
    """--tensor-type-file: REGEX=TYPE lines (a recipe), the first that matches a tensor's name wins."""

    def type_flags(self) -> tuple[list[str], list[str]]:
        """llama-quantize's flags that choose the tensor types, in the order its command gives them: those before
        the importance matrix (--allow-requantize, --pure) and those after (the overrides). The quantize command and
        a --dry-run of the same mixture share them."""
        before = ["--allow-requantize"] * self.allow_requantize + ["--pure"] * self.pure
        after = [flag for name, ggml_type in self.tensor_types.items() for flag in ("--tensor-type", f"{name}={ggml_type}")]
        if self.tensor_type_file:
            after += ["--tensor-type-file", str(Path(self.tensor_type_file.path).resolve())]
        if self.output_tensor_type:
            after += ["--output-tensor-type", self.output_tensor_type]
        if self.token_embedding_type:
            after += ["--token-embedding-type", self.token_embedding_type]
        return before, after


class QuantizeRecord(Record):
    stage: Literal["quantize"] = "quantize"
    """The stage that wrote it."""
    quant: str
    """The quant type of the ladder."""
    file_type: int
    """general.file_type of the output (llama.cpp's LLAMA_FTYPE)."""
    source: FileRef
    """The F16 GGUF it was made from."""
    output: FileRef
    """The quantized GGUF."""
    options: QuantizeOptions
    """What llama-quantize was asked for."""
    tool: ToolBuildRef
    """The llama-quantize that made it."""
    command: list[str]
    """The command line, as run."""
    tensors: list[TensorRow]
    """Each tensor's type and bytes before and after."""
    model_size_mib: float
    """The source's tensor data, as llama-quantize reported it (MiB)."""
    model_bpw: float
    """The source's bits per weight."""
    quant_size_mib: float
    """The quant's tensor data, as llama-quantize reported it (MiB)."""
    quant_bpw: float
    """The quant's bits per weight."""
    fallback_tensors: int = 0
    """Tensors llama-quantize typed otherwise than asked (their rows are not divisible by the block size)."""
    threads: int | None = None
    """Threads llama-quantize used (None: its default)."""
    model: ModelFacts
    """The model, as its header describes it."""

    @property
    def type_shares(self) -> list[TypeShare]:
        """Each tensor type of the file: its tensors and bytes, most bytes first."""
        return type_shares((t.type_after, t.bytes_after) for t in self.tensors)


# ---------------------------------------------------------------- validate


class CheckResult(Model):
    name: str
    """The check (container, model, tensors, type mix, metadata, numerics)."""
    ok: bool
    """Whether it passed."""
    detail: str
    """What it found."""

    def __init__(self, name: str, ok: bool, detail: str):
        super().__init__(name=name, ok=ok, detail=detail)


class WorstTensor(Model):
    name: str
    """The tensor."""
    type: str
    """Its type in the quant."""
    rel_rmse: float
    """Its relative RMS error against the source, on the sampled rows."""
    bound: float | None
    """The error its type is allowed (None: not checked)."""


class Placement(Model):
    mode: str
    """An offload mode: "gpu" (N = 0), "ncmoe N", or "cpu-moe" (N = every layer)."""
    n_cpu_moe: int
    """N: the layers whose experts stay in system RAM."""
    gpu_bytes: int
    """The weights on the GPU."""
    cpu_bytes: int
    """The weights in system RAM."""


class Fit(Model):
    gpu_gib: int
    """The GPU's memory (GiB)."""
    ctx: int
    """The context, in tokens."""
    n_cpu_moe: int | None
    """The smallest N that fits; None when even --cpu-moe does not fit."""
    gpu_bytes: int | None
    """Weights + KV cache + compute allowance on the GPU at that N."""
    advice: str = "does not fit"
    """The mode at that N, as a table cell: all on the GPU, -ncmoe N, --cpu-moe."""


class MemoryPlan(Model):
    file: str
    """The GGUF planned."""
    n_layer: int
    """Its layers."""
    kv_type: str
    """The KV cache's type (f16)."""
    compute_allowance_bytes: int
    """What the plan allows for llama.cpp's compute buffers."""
    weights: list[Placement] = []
    """Where the weights go, one per N = 0 .. n_layer."""
    kv_bytes: dict[int, int] = {}
    """The KV cache's bytes per context size."""
    fits: list[Fit] = []
    """What fits each GPU size at each context."""

    def placement(self, n_cpu_moe: int) -> Placement:
        return self.weights[n_cpu_moe]

    def covers(self, ctx_sizes: list[int]) -> bool:
        return set(ctx_sizes) <= set(self.kv_bytes)


class PromptFormat(Model):
    template_sha256: str
    """The sha256 of the file's chat template (tokenizer.chat_template), the source's too (the chat template check)."""
    template_chars: int
    """Its length in characters."""
    rendered: str | None
    """A system message and one user message rendered with it, generation prompt included (None: see why_not)."""
    why_not: str | None = None
    """Why it was not rendered (too long, too slow, an error the template raises)."""
    messages: list[dict[str, str]] = []
    """The conversation rendered (role and content of each message), which the card's chat request sends too."""


class ValidateRecord(Record):
    stage: Literal["validate"] = "validate"
    """The stage that wrote it."""
    quant: str
    """The quant type."""
    file: FileRef
    """The file checked."""
    source: FileRef
    """The F16 GGUF it was checked against."""
    numerics: str
    """How many rows the numerics check read: sample or full."""
    ok: bool
    """Whether every check passed."""
    checks: list[CheckResult]
    """Each check and what it found."""
    worst_tensors: list[WorstTensor]
    """The tensors with the largest error for their type."""
    plan: MemoryPlan
    """Where its bytes go under llama.cpp's placement rules."""
    prompt: PromptFormat | None = None
    """The file's chat template and an example conversation rendered with it (None: the file has none)."""
    sampling: dict[str, float | int | str] = {}
    """The file's general.sampling.* keys by their last part (temp, top_p, ...): llama.cpp's default sampling for
    it, which the converter takes from the checkpoint's generation_config.json (empty: the file sets none)."""

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]


# ---------------------------------------------------------------- bench


class Gpu(Model):
    name: str
    """The GPU's name."""
    memory_bytes: int | None = None
    """Its memory."""


class Machine(Model):
    cpu: str
    """The CPU's model name."""
    cores: int | None
    """CPU cores."""
    ram_bytes: int | None
    """System RAM."""
    gpus: list[Gpu] = []
    """The GPUs."""
    os: str
    """The operating system and its release."""
    date: str
    """When the figures were measured (UTC, ISO 8601)."""

    def same_as(self, other: "Machine") -> bool:
        """Figures measured on one are figures of the other: the date and OS release may differ."""
        return (self.cpu, self.cores, self.ram_bytes, self.gpus) == (other.cpu, other.cores, other.ram_bytes,
                                                                      other.gpus)


class PerplexityOptions(Model):
    text: str
    """The evaluation text's name."""
    text_sha256: str
    """Its sha256."""
    ctx: int
    """The context of each chunk, in tokens."""
    chunks: int
    """Chunks evaluated."""


class BenchOptions(Model):
    modes: list[str | int]
    """The offload modes measured: gpu, cpu-moe, or N for -ncmoe N."""
    n_prompt: int
    """Prompt tokens per speed test."""
    n_gen: int
    """Generated tokens per speed test."""
    repetitions: int
    """Repetitions of each speed test."""
    threads: int | None
    """CPU threads (None: llama.cpp's default)."""
    ctx: list[int]
    """The contexts the memory runs used."""
    timeout_s: float
    """The time each tool was allowed."""
    rpc: bool
    """Whether a ggml-rpc-server stood in for a GPU."""
    perplexity: PerplexityOptions
    """How quality was measured."""
    quality: bool = True
    """False: llama-perplexity not run (bench.quality)."""


class SpeedTest(Model):
    test: str
    """llama-bench's test name (pp64, tg16)."""
    n_prompt: int
    """Prompt tokens."""
    n_gen: int
    """Generated tokens."""
    avg_ts: float
    """Mean tokens per second."""
    stddev_ts: float
    """Its standard deviation."""
    samples_ts: list[float]
    """Tokens per second of each repetition."""
    n_threads: int
    """CPU threads."""
    n_cpu_moe: int
    """Layers whose experts stayed in system RAM."""
    n_gpu_layers: int
    """Layers offloaded."""


class SpeedRun(Model):
    mode: str
    """The offload mode."""
    command: list[str]
    """The llama-bench command line, as run."""
    backends: str | None
    """The backends llama-bench reported."""
    gpu_info: str | None
    """The GPU llama-bench reported."""
    cpu_info: str | None
    """The CPU llama-bench reported."""
    model_size: int | None
    """The model's bytes, as llama-bench reported them."""
    model_n_params: int | None
    """Its parameters, as llama-bench reported them."""
    build_commit: str | None
    """The llama.cpp commit llama-bench reported."""
    tests: list[SpeedTest]
    """Each test's figures."""


class DeviceMemory(Model):
    """One device's line of llama.cpp's memory breakdown at exit, in whole MiB."""

    device: str
    """The device (CUDA0, RPC0, ...)."""
    description: str
    """The GPU as llama.cpp names it (H200), or the RPC server's address."""
    mib: dict[str, int]
    """total, free, self, model, context, compute, unaccounted."""


class MemoryRun(Model):
    mode: str
    """The offload mode."""
    ctx: int
    """The context, in tokens."""
    command: list[str]
    """The llama-completion command line, as run."""
    devices: dict[str, dict[str, float]]
    """Device -> buffer kind (model, KV, compute) -> MiB, as llama.cpp allocated them."""
    device_mib: dict[str, float]
    """model, KV and compute MiB on the offload devices."""
    planned_mib: dict[str, float | None]
    """model and KV MiB as moeq's memory plan predicted them."""
    difference_mib: dict[str, float]
    """Measured minus planned MiB."""
    breakdown: list[DeviceMemory] = []
    """The offload devices' lines of the breakdown table (a second source)."""


class PerplexityFigures(Model):
    """What llama-perplexity printed; None where it printed nan. `X_err` is the ± of X."""

    model_config = ConfigDict(extra="forbid")
    command: list[str]
    """The llama-perplexity command line, as run."""
    ppl: float | None = None
    """Perplexity on the evaluation text."""
    ppl_err: float | None = None
    """± of ppl."""
    ppl_q: float | None = None
    """With --kl-divergence: the quant's perplexity."""
    ppl_q_err: float | None = None
    """± of ppl_q."""
    ppl_base: float | None = None
    """With --kl-divergence: the base's perplexity, from its saved logits."""
    ppl_base_err: float | None = None
    """± of ppl_base."""
    ppl_ratio: float | None = None
    """Mean PPL(Q)/PPL(base) as llama-perplexity printed it."""
    ppl_ratio_err: float | None = None
    """± of ppl_ratio."""
    kld_mean: float | None = None
    """Mean KL divergence of the quant's token distribution from the base's."""
    kld_mean_err: float | None = None
    """± of kld_mean."""
    kld_max: float | None = None
    """The largest KL divergence of any token."""
    kld_p99: float | None = None
    """Its 99th percentile."""
    kld_median: float | None = None
    """Its median."""
    same_top_p: float | None = None
    """The share of tokens (%) where the quant's most likely token is the base's."""
    same_top_p_err: float | None = None
    """± of same_top_p."""


class Quality(Model):
    base: PerplexityFigures
    """The F16 source's run, which saved the logits."""
    quant: PerplexityFigures
    """The quant's run against those logits."""
    text: str
    """The evaluation text's name."""
    ctx: int
    """The context of each chunk, in tokens."""
    chunks: int
    """Chunks evaluated."""


class Made(StrEnum):
    """How a candidate of the choice is made: its name in the records (the value), and `folder`, its folder under
    WORKSPACE/choice/TYPE/ and the suffix of its quantize record (quantize-Q4_K_M-with-imatrix.json)."""

    WITH = "with the importance matrix"
    WITHOUT = "without the importance matrix"
    SEARCHED = "with the searched recipe"

    @property
    def folder(self) -> str:
        return {Made.WITH: "with-imatrix", Made.WITHOUT: "without-imatrix", Made.SEARCHED: "searched"}[self]


class Candidate(Model):
    """One file the choice stage measured before choosing the one to publish."""

    name: Made
    """How it was made: with the importance matrix, without it, or with the searched recipe."""
    imatrix: ImatrixRef | None
    """The importance matrix it was made with (None: without one)."""
    file: FileRef
    """The file measured (the one chosen becomes the published file; the others are deleted once measured)."""
    quality: PerplexityFigures
    """Its figures against the F16 logits on the evaluation text."""
    speed: SpeedRun | None = None
    """Its tokens/s on the CPU (llama-bench, the bench's prompt and generation lengths), where a searched recipe
    is compared with the stock file (None: not measured)."""


class ChoiceRecord(Record):
    """Which of the measured candidates of a quant is published, and why."""

    stage: Literal["choice"] = "choice"
    """The stage that wrote it."""
    quant: str
    """The quant type."""
    options: PerplexityOptions
    """The evaluation text and how it was measured (the bench's quality options)."""
    tool: ToolBuildRef
    """The llama-perplexity that measured the candidates."""
    base: PerplexityFigures
    """The F16 source's run, which saved the logits."""
    candidates: list[Candidate]
    """Every candidate measured; the first is the stock choice, published unless another is better."""
    chosen: int
    """The index of the candidate published."""
    may_choose: bool
    """False where the pipeline named the importance matrix (quants[].imatrix: PATH): the file made without it is
    not published."""
    why: str
    """Why it was chosen, in words (the card says it)."""

    @property
    def published(self) -> Candidate:
        return self.candidates[self.chosen]

    @property
    def searched_published(self) -> bool:
        """Whether the file published is the searched recipe's (labelled TYPE_MOEQ): decided here only."""
        return self.published.name == Made.SEARCHED

    def others(self) -> list[Candidate]:
        return [c for i, c in enumerate(self.candidates) if i != self.chosen]


class RecipeEval(Model):
    """One recipe the search measured on the selection text."""

    label: str
    """What it is: stock, GROUP up or GROUP down (the stock recipe with one group a type higher or lower), or
    solution (the recipe chosen under the budget from those figures)."""
    changes: dict[str, str]
    """Each tensor whose type differs from the stock file's, and its type."""
    tensor_bytes: int
    """The bytes of its tensors."""
    gpu_bytes: int | None = None
    """The bytes of its tensors on the GPU under a GPU budget's placement (None: no GPU budget)."""
    quality: PerplexityFigures
    """Its figures against the F16 logits on the selection text."""


class RecipeGroup(Model):
    name: str
    """The group: a layer (or band of layers) and a tensor category, token_embd or output."""
    tensors: list[str]
    """The tensors it types together."""


class RecipeRecord(Record):
    """A rung's recipe searched on measured KL divergence under a budget, and every measurement it rests on."""

    stage: Literal["recipe"] = "recipe"
    """The stage that wrote it."""
    quant: str
    """The quant type of the rung (its general.file_type; the `--pure` base type of the rebuild)."""
    base_type: str
    """The tensor type `--pure` gives every tensor the recipe file does not name."""
    budget: str
    """The budget, as the pipeline gives it."""
    budget_bytes: int
    """The most the recipe's tensors may weigh."""
    gpu_budget_bytes: int | None = None
    """A GPU budget's room for the tensors on the GPU (the budget less the KV cache and the compute allowance);
    None without one."""
    source: FileRef
    """The F16 source."""
    imatrix: ImatrixRef | None
    """The importance matrix every type was quantized with (None: without one)."""
    selection: PerplexityOptions
    """The selection text (the search's objective; neither the calibration nor the evaluation text) and how it
    was measured."""
    tool: ToolBuildRef
    """The llama.cpp build that quantized and measured."""
    types: list[str]
    """The types its tensors could take, lowest to highest: one per-type --pure quantization of the source each."""
    groups: list[RecipeGroup]
    """What the recipe types together."""
    stock_types: dict[str, str]
    """Each quantized tensor's type in the stock file of this rung."""
    evals: list[RecipeEval]
    """Every recipe measured, the stock first."""
    chosen: int
    """The index in evals of the recipe chosen: the lowest measured mean KL divergence within the budget."""
    predicted_kld: float | None
    """The solution's mean KL divergence as the single-group figures predicted it (they are assumed to add)."""
    tensor_types: dict[str, str]
    """The chosen recipe: every quantized tensor's type."""
    token_embedding_type: str
    """token_embd's type (llama-quantize --token-embedding-type)."""
    output_tensor_type: str
    """output's type (llama-quantize --output-tensor-type)."""
    output: FileRef
    """The file the recipe makes, assembled from the per-type files."""
    recipe_file: FileRef
    """The recipe in llama-quantize's --tensor-type-file syntax (one ^NAME$=type line per tensor not of the base
    type)."""
    command: list[str]
    """The one llama-quantize command that rebuilds the file from the F16, the importance matrix and the recipe
    file."""
    seconds: float
    """The search's wall time (measurements made before an interruption count where they ran)."""
    runs: int
    """llama-perplexity runs made in this search (measurements found from an earlier, interrupted one are not
    counted)."""


class ModeError(Model):
    mode: str
    """The offload mode or measurement that failed."""
    error: str
    """Why."""


class NotMeasured(Model):
    mode: str
    """The offload mode not measured."""
    reason: str
    """Why (no device for it)."""


class BenchRecord(Record):
    stage: Literal["bench"] = "bench"
    """The stage that wrote it."""
    quant: str
    """The quant type."""
    file: FileRef
    """The file measured."""
    machine: Machine
    """The machine it was measured on."""
    tool: ToolBuildRef
    """The llama.cpp build that measured it."""
    options: BenchOptions
    """How it was measured."""
    speed: list[SpeedRun]
    """llama-bench's figures per offload mode."""
    memory: list[MemoryRun]
    """llama-completion's buffers per offload mode and context."""
    quality: Quality | None
    """llama-perplexity's figures against the F16 source (None: not measured)."""
    errors: list[ModeError]
    """The measurements that failed."""
    not_measured: list[NotMeasured] = []
    """The offload modes without a device to measure them on."""


class TypeShare(Model):
    """One tensor type of a file: how many tensors have it and how many of the file's bytes they take."""

    type: str
    """The ggml type (Q4_K, Q6_K, F32, ...)."""
    tensors: int
    """Tensors of that type."""
    bytes: int
    """Their bytes."""


def type_shares(tensors: Iterable[tuple[str, int]]) -> list[TypeShare]:
    """(type, bytes) per tensor -> each type's tensors and bytes, most bytes first."""
    shares: dict[str, list[int]] = {}
    for name, size in tensors:
        share = shares.setdefault(name, [0, 0])
        share[0] += 1
        share[1] += size
    return [TypeShare(type=name, tensors=n, bytes=size)
            for name, (n, size) in sorted(shares.items(), key=lambda item: (-item[1][1], item[0]))]


class PeerFile(Model):
    name: str
    """Its path in the repo it was downloaded from."""
    size: int
    """Its size in bytes."""
    sha256: str
    """The sha256 of its bytes, as the Hub's LFS metadata lists it and the download was checked against."""


class CompareRecord(Record):
    """A GGUF of the same model another publisher made (pipeline compare:), measured as the ladder's files are:
    KL divergence against the same F16 logits on the same text, and speed on the same machine."""

    stage: Literal["compare"] = "compare"
    """The stage that wrote it."""
    peer: str
    """Its id (names the record: compare-ID.json)."""
    repo: str
    """The Hub repo it came from."""
    repo_file: str
    """The GGUF's path in the repo (a split file's first shard), as the pipeline names it."""
    revision: str | None
    """The revision the pipeline names (None: main)."""
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    """The commit it was downloaded at."""
    label: str | None
    """What the card calls it (None: the file's name)."""
    files: list[PeerFile]
    """The file, or every shard of it."""
    refused: str | None = None
    """Why it was not measured: the first way it is not a quantization of the F16 (None: measured)."""
    size: int | None = None
    """Its bytes, every shard together."""
    bpw: float | None = None
    """Bits per weight: its tensors' bytes over their elements."""
    types: list[TypeShare] = []
    """Its tensor types, most bytes first: which types the publisher chose."""
    machine: Machine | None = None
    """The machine it was measured on."""
    tool: ToolBuildRef | None = None
    """The llama.cpp build that measured it."""
    options: BenchOptions | None = None
    """How it was measured (the bench's options; modes: those measured)."""
    speed: list[SpeedRun] = []
    """llama-bench's figures per offload mode."""
    quality: Quality | None = None
    """llama-perplexity's figures against the F16 source."""
    errors: list[ModeError] = []
    """The measurements that failed."""


# ---------------------------------------------------------------- shards, card, push


class ShardsRecord(Record):
    stage: Literal["shards"] = "shards"
    """The stage that wrote it."""
    quant: str
    """The quant type."""
    source: FileRef
    """The quant's file."""
    max_shard_size: int
    """The largest shard allowed (hub.max_shard_size), in bytes."""
    files: list[FileRef]
    """What the repo holds of the model: the quant itself, or its shards."""


class CardRecord(Record):
    stage: Literal["card"] = "card"
    """The stage that wrote it."""
    quant: str | None
    """The quant of a per-quant repo; None for the ladder's one repo (hub.layout single)."""
    quants: list[str] = []
    """The quants the repo holds."""
    repo_id: str
    """The Hub repo."""
    folder: str
    """The staged repo: exactly the files the Hub repo will hold."""
    readme: FileRef
    """The card."""
    manifest: FileRef
    """The records manifest beside it."""
    repo_files: list[str]
    """Every file of the staged repo."""
    template: str
    """The template it was rendered with."""
    templates_sha256: str
    """The sha256 of every file in the template's folder."""
    not_measured: list[str]
    """The sections the card says "not measured" for, for want of a record."""
    from_branch: str | None = None
    """moeq publish: the staging branch the repo's LFS files are on (copied from there, not staged here)."""
    from_commit: str | None = None
    """The branch's commit they were checked at, which the publish copies them from."""


class PushAction(StrEnum):
    """What a push does to one file of the repo."""

    ADD = "add"
    UPDATE = "update"
    UNCHANGED = "unchanged"
    DELETE = "delete"  # a file moeq published before and the card no longer lists (or any, with --prune)
    KEPT = "kept"  # a file moeq did not publish, left as it is
    SUPERSEDED = "superseded"  # a GGUF moeq published, replaced under another name, left as it is (the card says so)


class PushedFile(Model):
    path: str
    """The file's path in the repo."""
    action: PushAction
    """What the push did to it: add, update, unchanged, delete, or kept (a file moeq did not publish)."""
    size: int
    """Its size in bytes."""
    sha256: str | None = None
    """Its sha256 (None for a deletion)."""


class PushRecord(Record):
    stage: Literal["push"] = "push"
    """The stage that wrote it."""
    quant: str | None
    """The quant of a per-quant repo; None for the ladder's one repo (hub.layout single)."""
    quants: list[str] = []
    """The quants this push was asked for."""
    repo_id: str
    """The Hub repo."""
    create_pr: bool
    """Whether it opened a pull request instead of committing to main."""
    repo_existed: bool
    """Whether the repo was on the Hub before."""
    commit: str | None
    """The commit made; None when nothing had changed."""
    commit_url: str | None
    """Its address."""
    pr_url: str | None
    """The pull request's address."""
    files: list[PushedFile]
    """Each file and what the push did with it."""
    uploaded_bytes: int
    """The bytes sent."""
    readme_sha256: str
    """The sha256 of the README.md pushed."""
    manifest_sha256: str | None = None
    """The sha256 of the moeq-manifest.json pushed."""
    head: str | None = None
    """main's commit that holds these files after the push (the commit made, or the one that held them already);
    None for a pull request or a staging branch."""
    branch: str | None = None
    """The staging branch committed to (moeq build --stage-to), or None: main, or a pull request."""


RECORD_TYPES: dict[str, type[Record]] = {cls.stage_name(): cls for cls in (
    FetchRecord, ImatrixRecord, RecipeRecord, ChoiceRecord, QuantizeRecord, ValidateRecord, BenchRecord, CompareRecord,
    ShardsRecord,
    CardRecord, PushRecord)}


def record_json(record: Model) -> dict[str, Any]:
    """A record as plain JSON values (str keys, lists, numbers)."""
    return record.model_dump(mode="json")

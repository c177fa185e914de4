"""The records stages write and read: the only hand-off between stages.

Every record and every value nested in one is a pydantic model, saved as JSON with a schema version
and the key its stage was run with (stage_runner.py). A record of another schema version, or one that
does not match its type, is treated as absent (the stage runs again), never misread.

    record = QuantizeRecord.load(ws.record_path("quantize", "Q8_0"))
    record.output.sha256, record.model.expert_count
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from moeq.errors import InputError
from moeq.workspace import inside, write_json_atomic

SCHEMA_VERSION = 2  # 2: every nested value typed, and the stage runner's key stored in the record

R = TypeVar("R", bound="Model")


class Model(BaseModel):
    """A value of a record: unknown keys are refused, so a record of another shape is not half-read."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # JSON has no NaN: a figure is finite or absent


class Record(Model):
    """A stage's result; `load` reads one saved by the stage runner (None when absent or not current)."""

    @classmethod
    def load(cls: type[R], path: Path) -> R | None:
        return load_record(path, cls)


class FileRef(Model):
    path: str
    size: int
    sha256: str


class ToolBuildRef(Model):
    version: str
    build: str
    commit: str
    compiler: str
    target: str
    backend: str = "cpu"  # the ggml offload backend it was built with (cpu, cuda, ...)


# ---------------------------------------------------------------- source, quantize


class SourceRecord(Record):
    stage: Literal["source"] = "source"
    kind: str  # synth, local, gguf, hf
    origin: str  # repo@revision/file, a local path, or the synth options
    output: FileRef
    options: dict[str, Any] = {}  # synth options; or repo, revision, commit, file and files fetched
    license: FileRef | None = None  # the license file downloaded with a Hub checkpoint, kept to be published


class TensorRow(Model):
    name: str
    shape: list[int]
    type_before: str
    type_after: str
    bytes_before: int
    bytes_after: int


class ModelFacts(Model):
    """What later stages (cards) need to know of the model, read once from the source header."""

    architecture: str | None
    parameters: int
    tensors: int
    block_count: int | None
    expert_count: int | None
    expert_used_count: int | None
    context_length: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    expert_tensors: list[str] = []  # the routed experts' tensor kinds (ffn_up_exps, ...): what --cpu-moe moves
    shared_experts: list[str] = []  # the shared experts' (ffn_up_shexp, ...), which stay on the GPU


class ImatrixRef(Model):
    path: str
    sha256: str


# ---------------------------------------------------------------- imatrix


class CalibrationSource(Model):
    title: str
    url: str
    license: str


class CalibrationRef(Model):
    name: str  # the file's name; moeq's own text when `shipped`
    size: int
    sha256: str
    shipped: bool  # moeq's calibration text (moeq/data/CALIBRATION.md says what it holds)
    sources: list[CalibrationSource] = []  # what the shipped text is made of; a publisher's own text: none


class ExpertTokens(Model):
    layer: int
    expert: int
    tokens: int


class ExpertCoverage(Model):
    """Tokens the router sent to each expert while llama-imatrix ran, from the imatrix GGUF's counts."""

    min_expert_tokens: int  # the bar (imatrix.min_expert_tokens)
    tokens: dict[int, list[int]]  # layer -> tokens per expert
    under: list[ExpertTokens]  # experts under the bar, by layer and expert
    min: int
    median: float
    max: int
    experts: int  # layers x experts


class ImatrixRecord(Record):
    stage: Literal["imatrix"] = "imatrix"
    source: FileRef
    calibration: CalibrationRef
    output: FileRef
    format: str  # gguf, or dat (llama.cpp's legacy format)
    ctx: int
    chunks: int
    tokens: int  # chunks x ctx: the tokens llama-imatrix evaluated
    tool: ToolBuildRef
    command: list[str]
    coverage: ExpertCoverage
    warnings: list[str] = []


class QuantizeOptions(Model):
    """Everything that changes llama-quantize's output."""

    type: str
    imatrix: ImatrixRef | None = None
    tensor_types: dict[str, str] = {}
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    allow_requantize: bool = False


class QuantizeRecord(Record):
    stage: Literal["quantize"] = "quantize"
    quant: str
    file_type: int
    source: FileRef
    output: FileRef
    options: QuantizeOptions
    tool: ToolBuildRef
    command: list[str]
    tensors: list[TensorRow]
    model_size_mib: float
    model_bpw: float
    quant_size_mib: float
    quant_bpw: float
    fallback_tensors: int = 0
    threads: int | None = None
    model: ModelFacts


# ---------------------------------------------------------------- validate


class CheckResult(Model):
    name: str
    ok: bool
    detail: str

    def __init__(self, name: str, ok: bool, detail: str):
        super().__init__(name=name, ok=ok, detail=detail)


class WorstTensor(Model):
    name: str
    type: str
    rel_rmse: float
    bound: float | None


class Placement(Model):
    mode: str  # an OffloadMode name: "gpu" (N = 0), "ncmoe N", or "cpu-moe" (N = every layer)
    n_cpu_moe: int
    gpu_bytes: int
    cpu_bytes: int


class Fit(Model):
    gpu_gib: int
    ctx: int
    n_cpu_moe: int | None  # smallest N that fits; None when even --cpu-moe does not fit
    gpu_bytes: int | None  # weights + KV + allowance at that N
    advice: str = "does not fit"  # the mode at that N, as a table cell: all on the GPU, -ncmoe N, --cpu-moe


class MemoryPlan(Model):
    file: str
    n_layer: int
    kv_type: str
    compute_allowance_bytes: int
    weights: list[Placement] = []  # one per N = 0 .. n_layer
    kv_bytes: dict[int, int] = {}  # per context size
    fits: list[Fit] = []

    def placement(self, n_cpu_moe: int) -> Placement:
        return self.weights[n_cpu_moe]

    def covers(self, ctx_sizes: list[int]) -> bool:
        return set(ctx_sizes) <= set(self.kv_bytes)


class ValidateRecord(Record):
    stage: Literal["validate"] = "validate"
    quant: str
    file: FileRef
    source: FileRef
    numerics: str
    ok: bool
    checks: list[CheckResult]
    worst_tensors: list[WorstTensor]
    plan: MemoryPlan

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]


# ---------------------------------------------------------------- bench


class Gpu(Model):
    name: str
    memory_bytes: int | None = None


class Machine(Model):
    cpu: str
    cores: int | None
    ram_bytes: int | None
    gpus: list[Gpu] = []
    os: str
    date: str

    def same_as(self, other: "Machine") -> bool:
        """Figures measured on one are figures of the other: the date and OS release may differ."""
        return (self.cpu, self.cores, self.ram_bytes, self.gpus) == (other.cpu, other.cores, other.ram_bytes,
                                                                      other.gpus)


class PerplexityOptions(Model):
    text: str
    text_sha256: str
    ctx: int
    chunks: int


class BenchOptions(Model):
    modes: list[str | int]
    n_prompt: int
    n_gen: int
    repetitions: int
    threads: int | None
    ctx: list[int]
    timeout_s: float
    rpc: bool
    perplexity: PerplexityOptions
    quality: bool = True  # False: llama-perplexity not run (bench.quality)


class SpeedTest(Model):
    test: str  # pp64, tg16
    n_prompt: int
    n_gen: int
    avg_ts: float
    stddev_ts: float
    samples_ts: list[float]
    n_threads: int
    n_cpu_moe: int
    n_gpu_layers: int


class SpeedRun(Model):
    mode: str
    command: list[str]
    backends: str | None
    gpu_info: str | None
    cpu_info: str | None
    model_size: int | None
    model_n_params: int | None
    build_commit: str | None
    tests: list[SpeedTest]


class DeviceMemory(Model):
    """One device's line of llama.cpp's memory breakdown at exit, in whole MiB."""

    device: str  # CUDA0, RPC0, ...
    description: str  # the GPU as llama.cpp names it (H200), or the RPC server's address
    mib: dict[str, int]  # total, free, self, model, context, compute, unaccounted


class MemoryRun(Model):
    mode: str
    ctx: int
    command: list[str]
    devices: dict[str, dict[str, float]]  # device -> buffer kind (model, KV, compute) -> MiB
    device_mib: dict[str, float]  # model, KV, compute on the offload devices
    planned_mib: dict[str, float | None]  # model, KV
    difference_mib: dict[str, float]
    breakdown: list[DeviceMemory] = []  # the offload devices' lines of the breakdown table (a second source)


class PerplexityFigures(Model):
    """What llama-perplexity printed; None where it printed nan. `X_err` is the ± of X."""

    model_config = ConfigDict(extra="forbid")
    command: list[str]
    ppl: float | None = None
    ppl_err: float | None = None
    ppl_q: float | None = None
    ppl_q_err: float | None = None
    ppl_base: float | None = None
    ppl_base_err: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_err: float | None = None
    kld_mean: float | None = None
    kld_mean_err: float | None = None
    kld_max: float | None = None
    kld_p99: float | None = None
    kld_median: float | None = None
    same_top_p: float | None = None
    same_top_p_err: float | None = None


class Quality(Model):
    base: PerplexityFigures
    quant: PerplexityFigures
    text: str
    ctx: int
    chunks: int
    # The same type made without the importance matrix (for this measurement only): what the imatrix bought.
    without_imatrix: PerplexityFigures | None = None
    without_imatrix_file: FileRef | None = None

    def imatrix_effect(self) -> str | None:
        """What the importance matrix did to the mean KL divergence: lowered, raised, or unclear (the difference
        is within twice the combined uncertainty); None without both figures."""
        with_, without = self.quant, self.without_imatrix
        if without is None or with_.kld_mean is None or without.kld_mean is None:
            return None
        spread = 2 * math.hypot(with_.kld_mean_err or 0.0, without.kld_mean_err or 0.0)
        difference = with_.kld_mean - without.kld_mean
        return "unclear" if abs(difference) <= spread else ("lowered" if difference < 0 else "raised")


class ModeError(Model):
    mode: str
    error: str


class NotMeasured(Model):
    mode: str
    reason: str


class BenchRecord(Record):
    stage: Literal["bench"] = "bench"
    quant: str
    file: FileRef
    machine: Machine
    tool: ToolBuildRef
    options: BenchOptions
    speed: list[SpeedRun]
    memory: list[MemoryRun]
    quality: Quality | None
    errors: list[ModeError]
    not_measured: list[NotMeasured] = []  # per offload mode without a device


# ---------------------------------------------------------------- shards, card, push


class ShardsRecord(Record):
    stage: Literal["shards"] = "shards"
    quant: str
    source: FileRef  # the quant
    max_shard_size: int
    files: list[FileRef]  # what the repo holds of the model: the quant itself, or its shards


class CardRecord(Record):
    stage: Literal["card"] = "card"
    quant: str | None  # None for the one repo of hub.layout single
    quants: list[str] = []  # the quants the repo holds
    repo_id: str
    folder: str  # the staged repo: exactly the files the Hub repo will hold
    readme: FileRef
    manifest: FileRef
    repo_files: list[str]
    template: str
    templates_sha256: str
    not_measured: list[str]  # sections the card says "not measured" for, for want of a record


class PushedFile(Model):
    path: str
    action: str  # add, update, unchanged, delete
    size: int
    sha256: str | None = None


class PushRecord(Record):
    stage: Literal["push"] = "push"
    quant: str | None  # None for the one repo of hub.layout single
    quants: list[str] = []  # the quants this push was asked for
    repo_id: str
    create_pr: bool
    repo_existed: bool
    commit: str | None  # None when nothing had changed
    commit_url: str | None
    pr_url: str | None
    files: list[PushedFile]
    uploaded_bytes: int
    readme_sha256: str


# ---------------------------------------------------------------- saved records


class Saved(Model):
    """A record as it lies in WORKSPACE/records/: what the stage made, with how and when it was made."""

    schema_version: int
    key: dict[str, Any] | None  # the stage's declared inputs when it ran (None: always runs)
    wall_s: float
    record: Any


PATH_KEYS = ("path", "folder")  # the keys of a record that hold a file or folder
RECORD_TYPES: dict[str, type[Record]] = {cls.model_fields["stage"].default: cls for cls in (
    SourceRecord, ImatrixRecord, QuantizeRecord, ValidateRecord, BenchRecord, ShardsRecord, CardRecord, PushRecord)}


def record_json(record: Model) -> dict[str, Any]:
    """A record as plain JSON values (str keys, lists, numbers)."""
    return record.model_dump(mode="json")


def save_record(path: Path, record: Model, key: dict[str, Any] | None, wall_s: float) -> None:
    """Save under WORKSPACE/records/; paths inside the workspace are kept relative to it."""
    data = {"schema_version": SCHEMA_VERSION, "key": key, "wall_s": round(wall_s, 3),
            "record": _paths(record_json(record), _workspace_of(path), relative=True)}
    write_json_atomic(path, data)


def load_saved(path: Path, cls: type[R]) -> tuple[Saved | None, str | None]:
    """The saved record at `path` (its `record` of type `cls`), or None and why it cannot be used.

    Workspace-relative paths come back under the workspace the record is in now, so a moved
    workspace keeps working and a copied one refers to its own files."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"unreadable ({exc.__class__.__name__})"
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        return None, f"written by another moeq (record schema {version}, this moeq reads {SCHEMA_VERSION})"
    try:
        saved = Saved.model_validate(data)
        saved.record = cls.model_validate(_paths(data["record"], _workspace_of(path), relative=False))
    except _PathOutside as exc:
        return None, f"names the path {str(exc)[:200]!r}, which leaves the workspace"
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        return None, f"not a {cls.model_fields['stage'].default} record ({where}: {exc.errors()[0]['msg']})"
    return saved, None


def load_record(path: Path, cls: type[R]) -> R | None:
    saved, _why = load_saved(path, cls)
    return saved.record if saved else None


def _workspace_of(record_path: Path) -> Path:
    # WORKSPACE/records/NAME.json; abspath, not resolve: paths stay spelled as the workspace spells them
    return Path(os.path.abspath(record_path)).parent.parent


class _PathOutside(ValueError):
    """A record's workspace-relative path that climbs out of the workspace."""


def _paths(value: Any, root: Path, relative: bool, key: str = "") -> Any:
    """Paths under `root` made relative to it (relative=True), or relative paths made absolute under it."""
    if isinstance(value, dict):
        return {k: _paths(v, root, relative, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_paths(v, root, relative, key) for v in value]
    if key not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    path = Path(value)
    if not relative:
        if path.is_absolute():
            return value
        within = inside(root, value)
        if within is None:
            raise _PathOutside(value)
        return str(within)
    try:
        return path.relative_to(root).as_posix() if path.is_absolute() else value
    except ValueError:  # outside the workspace (a local source, an imatrix, a template): kept as it is
        return value


class Records:
    """The workspace's records, each loaded once: what the stage functions receive as arguments.

    `require` turns an absent record into one error that says which command makes it."""

    def __init__(self, ws, config_path: Path | str = "pipeline.yaml"):
        self.ws = ws
        self.config_path = config_path
        self._cache: dict[tuple[str, str | None], Saved | None] = {}
        self.reasons: dict[tuple[str, str | None], str] = {}

    def saved(self, stage: str, quant: str | None = None) -> Saved | None:
        if (stage, quant) not in self._cache:
            saved, why = load_saved(self.ws.record_path(stage, quant), RECORD_TYPES[stage])
            self._cache[(stage, quant)] = saved
            if why:
                self.reasons[(stage, quant)] = why
        return self._cache[(stage, quant)]

    def get(self, stage: str, quant: str | None = None):
        saved = self.saved(stage, quant)
        return saved.record if saved else None

    def forget(self, stage: str, quant: str | None = None) -> None:
        self._cache.pop((stage, quant), None)
        self.reasons.pop((stage, quant), None)

    def put(self, stage: str, quant: str | None, saved: Saved) -> None:
        self._cache[(stage, quant)] = saved
        self.reasons.pop((stage, quant), None)

    def require(self, stage: str, quant: str | None = None):
        record = self.get(stage, quant)
        if record is None:
            path = self.ws.record_path(stage, quant)
            command = {"source": "fetch"}.get(stage, stage)
            option = f" --quant {quant}" if quant else ""
            why = self.reasons.get((stage, quant), f"no {stage} record" + (f" for {quant}" if quant else ""))
            raise InputError(f"{path}: {why}; run moeq {command} --config {self.config_path}{option} first")
        return record

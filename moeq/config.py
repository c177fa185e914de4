"""pipeline.yaml -> a typed, validated Pipeline.

Every problem is refused with `FILE:LINE: key.path: what is wrong`, using the line numbers
PyYAML's composer keeps on each node. Unknown keys, duplicate keys, wrong types, unknown
quant types, bad repo ids and unsafe relative names are all errors, never warnings.

    pipeline = load_pipeline(Path("examples/tiny-phimoe.yaml"))
    [q.type for q in pipeline.quants]
    # -> ['Q8_0', 'Q4_K_M', 'Q2_K']
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from moeq import quant_types
from moeq.errors import ConfigError
from moeq.offload import MODE_HINT, is_setting
from moeq.toolchain import BACKENDS, Toolchain
from moeq.workspace import read_text_limited

SOURCE_KINDS = ("hf", "gguf", "local", "synth")
SYNTH_ARCHS = ("phimoe", "qwen3moe", "llama-moe", "qwen2moe")  # moeq/synth.py's ARCHS
REPO_TEMPLATE_FIELDS = {"namespace", "model", "quant", "quant_slug", "quant_lower", "file_stem"}
# The Hub's usual name for one quant's repo (GGUF-my-repo's): <Model>-<QUANT>-GGUF, from the pipeline's model.
DEFAULT_REPO_TEMPLATE = "{namespace}/{model}-{quant}-GGUF"
# One repo for the whole ladder (bartowski's and mradermacher's layout, what llama.cpp's -hf REPO:QUANT expects).
DEFAULT_SINGLE_REPO = "{namespace}/{model}-GGUF"
LAYOUTS = ("single", "per-quant")
DEFAULT_FILE_TEMPLATE = "{file_stem}-{quant}.gguf"
PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}
PORTABLE_NAME = re.compile(r"[A-Za-z0-9._+\-/]+")  # '/' only where a relative path may have folders
MAX_NAME = 200  # characters in one file name: the filesystem's limit is 255 bytes, with room for suffixes
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


@dataclass(frozen=True)
class QuantSpec:
    type: str
    imatrix: Path | str | None = None  # IMATRIX_AUTO, a file, or None (none)
    tensor_types: tuple[tuple[str, str], ...] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    file: str = ""  # output file name inside the workspace

    @property
    def slug(self) -> str:
        return self.type.lower().replace("_", "-")


@dataclass(frozen=True)
class HubSpec:
    namespace: str
    layout: str = "single"  # one repo for the ladder, or "per-quant": one repo per quant (repo_template)
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

    def quant(self, name: str) -> QuantSpec:
        for q in self.quants:
            if q.type.lower() == name.lower():
                return q
        known = ", ".join(q.type for q in self.quants)
        raise ConfigError(f"{self.path}: quants: no quant {name!r} in the ladder (configured: {known})")

    def repo_id(self, quant: QuantSpec) -> str:
        return render_repo_id(self.hub, self.model, quant)

    @property
    def single_repo(self) -> bool:
        return self.hub.layout == "single"


def render_repo_id(hub: HubSpec, model: ModelSpec, quant: QuantSpec) -> str:
    if hub.layout == "single":
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


# ---------------------------------------------------------------- node walking


class _Node:
    """A YAML node with its key path, for error messages that point at the line."""

    def __init__(self, file: Path, node: yaml.Node, path: str):
        self.file, self.node, self.path = file, node, path

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.file}:{self.line}: {self.path or '(top level)'}: {message}")

    def child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def mapping(self, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, _Node]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.fail(f"expected a mapping, got {_kind(self.node)}")
        out: dict[str, _Node] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _Node(self.file, key_node, self.path).fail("keys must be plain names")
            key = key_node.value
            where = _Node(self.file, key_node, self.child_path(key))
            if key not in allowed:
                raise where.fail(f"unknown key; allowed here: {', '.join(allowed)}")
            if key in out:
                raise where.fail(f"duplicate key (first at line {out[key].line})")
            out[key] = _Node(self.file, value_node, self.child_path(key))
        for key in required:
            if key not in out:
                raise self.fail(f"missing required key {key!r}")
        return out

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.fail(f"expected a single value, got {_kind(self.node)}")
        if self.node.tag not in PLAIN_TAGS:
            raise self.fail(f"the YAML tag {self.node.tag!r} is not allowed; write a plain string, number or boolean")
        try:
            value = yaml.safe_load(yaml.serialize(self.node))
        except yaml.YAMLError as exc:
            raise self.fail(f"not a valid value ({_first_sentence(exc)})") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"{value} is not a usable number")
        return value

    def str(self) -> str:
        value = self.scalar()
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"expected a non-empty string, got {value!r}")
        return value

    def int(self, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(f"must be at most {maximum}, got {value}")
        return value

    def bool(self) -> bool:
        value = self.scalar()
        if not isinstance(value, bool):
            raise self.fail(f"expected true or false, got {value!r}")
        return value

    def list(self) -> list[_Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.fail(f"expected a list, got {_kind(self.node)}")
        return [_Node(self.file, n, self.child_path(i)) for i, n in enumerate(self.node.value)]

    def relative_name(self) -> str:
        """A file name inside a repo or the workspace: relative, no '..', portable characters, not too long."""
        value = self.str()
        pure = PurePosixPath(value)
        if pure.is_absolute() or value.startswith("~") or ".." in pure.parts or "\\" in value:
            raise self.fail(f"{value[:80]!r} is not a safe relative name; use a plain name like 'model-Q8_0.gguf'")
        if not PORTABLE_NAME.fullmatch(value):
            raise self.fail(f"{value[:80]!r} has characters a file name should not (spaces, control or non-ASCII "
                            "characters); use letters, digits and . _ - +")
        if any(len(part) > MAX_NAME for part in pure.parts):
            raise self.fail(f"a name of {len(value)} characters; file names are at most {MAX_NAME}")
        return value

    def path_value(self, base: Path, must_exist: bool = False) -> Path:
        """A local path: absolute, or relative to the pipeline file's folder."""
        raw = Path(self.str()).expanduser()
        resolved = raw if raw.is_absolute() else base / raw
        if must_exist and not resolved.exists():
            raise self.fail(f"{resolved} does not exist; fix the path (relative paths start at {base})")
        return resolved


def _plain(n: _Node, budget: list[int]) -> Any:
    """A YAML subtree as plain JSON-able values: strings, finite numbers, booleans, null, lists, mappings.

    `budget` counts the values left: aliases can expand a small file into billions of values."""
    budget[0] -= 1
    if budget[0] < 0:
        raise n.fail(f"more than {MAX_EXTRA_VALUES} values (YAML aliases expand?); keep card.extra small")
    if isinstance(n.node, yaml.SequenceNode):
        return [_plain(item, budget) for item in n.list()]
    if isinstance(n.node, yaml.MappingNode):
        if n.node.tag != "tag:yaml.org,2002:map":
            raise n.fail(f"the YAML tag {n.node.tag!r} is not allowed; write a plain mapping")
        out: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for key_node, value_node in n.node.value:
            key = _Node(n.file, key_node, n.path).str()
            child = _Node(n.file, value_node, n.child_path(key))
            if key in out:
                raise _Node(n.file, key_node, n.child_path(key)).fail(f"duplicate key (first at line {lines[key]})")
            lines[key] = key_node.start_mark.line + 1
            out[key] = _plain(child, budget)
        return out
    return n.scalar()


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{node.value!r}"


# ---------------------------------------------------------------- sections


def _model(n: _Node) -> ModelSpec:
    m = n.mapping(("name", "base_model", "license", "languages", "quantized_by", "file_stem", "parameters"),
                  required=("name", "base_model", "license", "quantized_by"))
    base_model = _repo_id(m["base_model"])
    languages: tuple[str, ...] = ("en",)
    if "languages" in m:
        items = m["languages"].list()
        if not items:
            raise m["languages"].fail("list at least one language code, e.g. [en]")
        languages = tuple(item.str() for item in items)
    name = m["name"].str()
    if len(name) > MAX_NAME:
        raise m["name"].fail(f"a name of {len(name)} characters; keep it to {MAX_NAME}")
    file_stem = m["file_stem"].relative_name() if "file_stem" in m else _slug(name)
    if "/" in file_stem:
        raise m["file_stem"].fail("must be a plain name without '/'")
    return ModelSpec(
        name=name, base_model=base_model, license=m["license"].str(), languages=languages,
        quantized_by=m["quantized_by"].str(), file_stem=file_stem,
        parameters=m["parameters"].int(minimum=1, maximum=10**18) if "parameters" in m else None,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "model"


def _repo_id(n: _Node) -> str:
    value = n.str()
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise n.fail(f"{value!r} is not a valid Hub repo id ({_first_sentence(exc)})") from None
    if value.count("/") != 1:
        raise n.fail(f"{value!r} must be 'namespace/name'")
    return value


def _first_sentence(exc: Exception) -> str:
    return str(exc).strip().split("\n")[0].rstrip(".")


def _synth(n: _Node) -> SynthSpec:
    fields = SynthSpec.__dataclass_fields__
    m = n.mapping(tuple(fields))
    values = {key: node.int(minimum=0 if key == "seed" else 1, maximum=SYNTH_MAX.get(key, 2**32 - 1))
              for key, node in m.items()}
    spec = SynthSpec(**values)
    if spec.experts_used > spec.experts:
        raise m.get("experts_used", n).fail(f"experts_used ({spec.experts_used}) exceeds experts ({spec.experts})")
    for key in ("embd", "ff"):
        if getattr(spec, key) % 256:
            raise m.get(key, n).fail(f"must be a multiple of 256 so K-quants apply, got {getattr(spec, key)}")
    if spec.embd % spec.heads or spec.heads % spec.kv_heads:
        raise n.fail("embd must divide by heads, and heads by kv_heads")
    return spec


def _source(n: _Node, base: Path) -> SourceSpec:
    m = n.mapping(("kind", "repo", "revision", "file", "path", "synth", "train", "arch"), required=("kind",))
    kind = m["kind"].str()
    if kind not in SOURCE_KINDS:
        raise m["kind"].fail(f"unknown source kind {kind!r}; use one of {', '.join(SOURCE_KINDS)}")
    needs = {"hf": ("repo", "revision"), "gguf": ("repo", "revision", "file"), "local": ("path",), "synth": ()}
    allowed_extra = {"hf": ("repo", "revision"), "gguf": ("repo", "revision", "file"),
                     "local": ("path",), "synth": ("synth", "train", "arch")}
    for key in needs[kind]:
        if key not in m:
            raise n.fail(f"source kind {kind!r} needs {key!r}")
    for key in m:
        if key != "kind" and key not in allowed_extra[kind]:
            raise m[key].fail(f"not used by source kind {kind!r}; remove it")
    return SourceSpec(
        kind=kind,
        repo=_repo_id(m["repo"]) if "repo" in m else None,
        revision=m["revision"].str() if "revision" in m else None,
        file=m["file"].relative_name() if "file" in m else None,
        path=m["path"].path_value(base) if "path" in m else None,
        synth=_synth(m["synth"]) if "synth" in m else (SynthSpec() if kind == "synth" else None),
        train=m["train"].bool() if "train" in m else False,
        arch=_synth_arch(m),
    )


def _synth_arch(m: dict) -> str:
    if "arch" not in m:
        return "phimoe"
    arch = m["arch"].str()
    if arch not in SYNTH_ARCHS:
        raise m["arch"].fail(f"unknown synth architecture {arch!r}; use one of {', '.join(SYNTH_ARCHS)}")
    if arch != "phimoe" and "train" in m and m["train"].bool():
        raise m["train"].fail(f"only the phimoe model is trained (transformers' PhimoeForCausalLM); {arch} is "
                              "made with random weights: remove train")
    return arch


def _ggml_type(n: _Node) -> str:
    value = n.str()
    found = quant_types.lookup_ggml_type(value)
    if found is None:
        raise n.fail(f"unknown tensor type {value!r}; use a ggml type such as q8_0, q6_K, q4_K, f16")
    return found.name.lower()


MAX_PATTERN = 256  # a tensor name is tens of characters; llama-quantize gets every pattern on its command line
QUANTIFIED_GROUP = re.compile(r"\)[*+?]")


def _check_pattern(pattern: str, where: _Node) -> None:
    """A tensor_types pattern llama.cpp's std::regex runs in bounded time: short, and no quantified group (the
    nested repetition, such as '(.*)*x', that backtracks exponentially)."""
    if len(pattern) > MAX_PATTERN:
        raise where.fail(f"a pattern of {len(pattern)} characters; keep it to {MAX_PATTERN}")
    if QUANTIFIED_GROUP.search(pattern):
        raise where.fail(f"{pattern[:80]!r} repeats a group ('(...)*', '(...)+' or '(...)?'), which llama.cpp's "
                         "regex engine can take minutes over; write the alternatives without a quantifier, e.g. "
                         "'ffn_(up|gate)_exps'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise where.fail(f"{pattern[:80]!r} is not a valid pattern ({exc.msg})") from None


def _quant(n: _Node, base: Path, model: ModelSpec) -> QuantSpec:
    if isinstance(n.node, yaml.ScalarNode):  # "- Q8_0" shorthand
        m = {"type": n}
    else:
        m = n.mapping(("type", "imatrix", "tensor_types", "output_tensor_type", "token_embedding_type", "file"),
                      required=("type",))
    type_node = m["type"]
    raw_type = type_node.str()
    known = quant_types.lookup(raw_type)
    if known is None:
        raise type_node.fail(f"unknown quant type {raw_type!r}; llama-quantize accepts "
                             f"{', '.join(quant_types.QUANT_TYPES)}")
    if known.name in UNQUANTIZED:
        raise type_node.fail(f"{known.name} is not a quantization; the ladder lists quant types such as Q8_0, "
                             "Q4_K_M, Q2_K (the F16 source comes from source:)")
    overrides: list[tuple[str, str]] = []
    if "tensor_types" in m:
        tt = m["tensor_types"]
        if not isinstance(tt.node, yaml.MappingNode):
            raise tt.fail("expected a mapping of tensor name -> type, e.g. {attn_v: q8_0}")
        seen: set[str] = set()
        for key_node, value_node in tt.node.value:
            key = _Node(n.file, key_node, tt.path).str()
            entry = _Node(n.file, value_node, tt.child_path(key))
            if not re.fullmatch(r"[A-Za-z0-9_.*\\\[\]()|+?^$-]+", key):
                raise entry.fail(f"{key[:80]!r} is not a tensor name or pattern")
            _check_pattern(key, entry)
            if key.lower() in seen:
                raise entry.fail("duplicate tensor override")
            seen.add(key.lower())
            overrides.append((key.lower(), _ggml_type(entry)))
    quant_type = known.name
    file = _quant_file(m["file"]) if "file" in m else DEFAULT_FILE_TEMPLATE.format(
        file_stem=model.file_stem, quant=quant_type)
    return QuantSpec(
        type=quant_type,
        imatrix=_quant_imatrix(m["imatrix"], base) if "imatrix" in m else None,
        tensor_types=tuple(overrides),
        output_tensor_type=_ggml_type(m["output_tensor_type"]) if "output_tensor_type" in m else None,
        token_embedding_type=_ggml_type(m["token_embedding_type"]) if "token_embedding_type" in m else None,
        file=file,
    )


def _quant_imatrix(n: _Node, base: Path) -> Path | str | None:
    """`auto` (the imatrix stage's output), `none`, or the path of an importance matrix made elsewhere."""
    value = n.scalar()
    if value is None or value in ("none", False):
        return None
    if value == IMATRIX_AUTO:
        return IMATRIX_AUTO
    return n.path_value(base, must_exist=True)


def _quant_file(n: _Node) -> str:
    """A quant's output file: a plain `.gguf` name, so it can be neither a file of the staged repo (README.md,
    moeq-manifest.json) nor another quant's llama-quantize log (`X.gguf.log`) or partial file."""
    value = n.relative_name()
    if "/" in value or not value.lower().endswith(".gguf") or value.lower() == ".gguf":
        raise n.fail(f"{value!r} is not a GGUF file name; use a plain name ending in .gguf, like 'model-Q8_0.gguf'")
    return value


_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int | None:
    """'50GB' -> 50_000_000_000 (decimal, as llama-gguf-split counts); None when unparseable."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _hub(n: _Node, model: ModelSpec, quants: tuple[QuantSpec, ...]) -> HubSpec:
    m = n.mapping(("namespace", "layout", "repo", "repo_template", "private", "create_pr", "max_shard_size", "push"),
                  required=("namespace",))
    namespace = m["namespace"].str()
    try:
        validate_repo_id(namespace)
    except HFValidationError:
        raise m["namespace"].fail(f"{namespace!r} is not a valid Hub user or organization name") from None
    if "/" in namespace:
        raise m["namespace"].fail("a namespace is one name, without '/'")
    layout = m["layout"].str() if "layout" in m else "single"
    if layout not in LAYOUTS:
        raise m["layout"].fail(f"{layout!r}: use single (one repo for the ladder) or per-quant (a repo per quant)")
    unused = "repo_template" if layout == "single" else "repo"
    if unused in m:
        raise m[unused].fail(f"not used with hub.layout {layout}; "
                             + ("name the one repo with hub.repo" if layout == "single"
                                else "name each quant's repo with hub.repo_template"))
    max_shard = 50_000_000_000
    if "max_shard_size" in m:
        raw = m["max_shard_size"].scalar()
        parsed = raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_size(str(raw))
        if not parsed or parsed <= 0:
            raise m["max_shard_size"].fail(f"{raw!r} is not a size; write e.g. 50GB, 45G or 500MB")
        if parsed < 10**6:
            raise m["max_shard_size"].fail(f"{raw!r} is under 1MB; llama-gguf-split splits in whole megabytes")
        max_shard = parsed
    spec = HubSpec(
        namespace=namespace, layout=layout,
        private=m["private"].bool() if "private" in m else False,
        create_pr=m["create_pr"].bool() if "create_pr" in m else False,
        max_shard_size=max_shard, push=m["push"].bool() if "push" in m else False,
    )
    if layout == "single":
        for quant in quants:  # llama.cpp's -hf REPO:TYPE and the Hub's quant label read the type from the name
            if not re.search(re.escape(quant.type) + r"[.-]", quant.file, re.IGNORECASE):
                raise n.fail(f"quants: {quant.type}'s file {quant.file!r} does not carry its quant type; in one repo "
                             f"clients pick a quant by name (e.g. {model.file_stem}-{quant.type}.gguf)")
            rest = re.sub(re.escape(quant.type) + r"(?=[.-])", "", quant.file, flags=re.IGNORECASE)
            other = next((t for t in quant_types.QUANT_TYPES if t != quant.type
                          and re.search(re.escape(t) + r"[.-]", rest, re.IGNORECASE)), None)
            if other:
                raise n.fail(f"quants: {quant.type}'s file {quant.file!r} also carries the quant type {other}, so "
                             f"llama.cpp's -hf REPO:{other} could pick it; name it e.g. "
                             f"{model.file_stem}-{quant.type}.gguf")
        return _single_repo(m, spec, model, namespace)
    return _per_quant_repos(m, n, dataclasses.replace(spec, repo_template=m["repo_template"].str()
                                                      if "repo_template" in m else DEFAULT_REPO_TEMPLATE),
                            model, quants, namespace)


def _single_repo(m: dict, spec: HubSpec, model: ModelSpec, namespace: str) -> HubSpec:
    where = m.get("repo")
    repo = where.str() if where else DEFAULT_SINGLE_REPO.format(namespace=namespace, model=repo_name(model.name))
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise (where or m["namespace"]).fail(f"{repo!r} is not a valid repo id ({_first_sentence(exc)})") from None
    if not repo.startswith(namespace + "/"):
        raise (where or m["namespace"]).fail(f"{repo!r} is outside the namespace {namespace!r}")
    return dataclasses.replace(spec, repo=repo)


def _per_quant_repos(m: dict, n: _Node, spec: HubSpec, model: ModelSpec, quants: tuple[QuantSpec, ...],
                     namespace: str) -> HubSpec:
    template = spec.repo_template
    where = m.get("repo_template", n)
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise where.fail(f"bad template: {exc}") from None
    unknown = names - REPO_TEMPLATE_FIELDS
    if unknown:
        raise where.fail(f"unknown placeholder {{{sorted(unknown)[0]}}}; "
                         f"use {', '.join('{' + f + '}' for f in sorted(REPO_TEMPLATE_FIELDS))}")
    if len(quants) > 1 and not names & {"quant", "quant_slug", "quant_lower"}:
        raise where.fail("must contain {quant_slug} (or {quant}) so each quant gets its own repo")
    seen: dict[str, str] = {}
    for quant in quants:
        repo = render_repo_id(spec, model, quant)
        if repo.lower() in seen:
            raise where.fail(f"gives {repo!r} for both {seen[repo.lower()]} and {quant.type}; each quant needs its "
                             "own repo, or one push would delete the other's file")
        seen[repo.lower()] = quant.type
        try:
            validate_repo_id(repo)
        except HFValidationError as exc:
            raise where.fail(f"gives {repo!r} for {quant.type}, not a valid repo id ({_first_sentence(exc)})") from None
        if not repo.startswith(namespace + "/"):
            raise where.fail(f"gives {repo!r}, outside the namespace {namespace!r}")
    return spec


def _card(n: _Node, base: Path) -> CardSpec:
    m = n.mapping(("template", "extra"))
    extra: tuple[tuple[str, Any], ...] = ()
    if "extra" in m:
        node = m["extra"]
        if not isinstance(node.node, yaml.MappingNode):
            raise node.fail("expected a mapping of fact name -> value")
        extra = tuple(sorted(_plain(node, [MAX_EXTRA_VALUES]).items()))
    return CardSpec(
        template=m["template"].path_value(base, must_exist=True) if "template" in m else None,
        extra=extra,
    )


def _bench(n: _Node, base: Path) -> BenchSpec:
    m = n.mapping(("modes", "n_prompt", "n_gen", "repetitions", "threads", "ctx", "timeout_s", "perplexity", "rpc",
                   "quality"))
    defaults = BenchSpec()
    modes = defaults.modes
    if "modes" in m:
        modes_list = []
        for item in m["modes"].list():
            value = item.scalar()
            if is_setting(value):
                modes_list.append(str(value))
            else:
                raise item.fail(f"unknown mode {value!r}; {MODE_HINT}")
        modes = tuple(modes_list)
    ppl = defaults.perplexity
    if "perplexity" in m:
        p = m["perplexity"].mapping(("text", "ctx", "chunks"))
        ppl = PerplexitySpec(
            text=p["text"].path_value(base, must_exist=True) if "text" in p else None,
            ctx=p["ctx"].int(minimum=16, maximum=MAX_CTX) if "ctx" in p else defaults.perplexity.ctx,
            chunks=p["chunks"].int(minimum=1, maximum=100_000) if "chunks" in p else defaults.perplexity.chunks,
        )
    if "n_prompt" in m and "n_gen" in m and m["n_prompt"].int() == 0 and m["n_gen"].int() == 0:
        raise m["n_gen"].fail("n_prompt and n_gen are both 0: llama-bench would measure nothing")
    return BenchSpec(
        modes=modes,
        n_prompt=m["n_prompt"].int(minimum=0, maximum=MAX_CTX) if "n_prompt" in m else defaults.n_prompt,
        n_gen=m["n_gen"].int(minimum=0, maximum=MAX_CTX) if "n_gen" in m else defaults.n_gen,
        repetitions=m["repetitions"].int(minimum=1, maximum=1000) if "repetitions" in m else defaults.repetitions,
        threads=m["threads"].int(minimum=1, maximum=4096) if "threads" in m else None,
        ctx=tuple(i.int(minimum=1, maximum=MAX_CTX) for i in m["ctx"].list()) if "ctx" in m else defaults.ctx,
        timeout_s=m["timeout_s"].int(minimum=1, maximum=MAX_TIMEOUT_S) if "timeout_s" in m else defaults.timeout_s,
        perplexity=ppl,
        rpc=_rpc(m["rpc"]) if "rpc" in m else None,
        quality=m["quality"].bool() if "quality" in m else defaults.quality,
    )


def _rpc(n: _Node) -> str:
    value = n.str()
    if value != "local" and not re.fullmatch(r"[\w.\-]+:\d{1,5}", value):
        raise n.fail(f"{value!r} is not HOST:PORT; use e.g. 127.0.0.1:50052, or local to start a ggml-rpc-server")
    return value


def _imatrix(n: _Node, base: Path) -> ImatrixSpec:
    m = n.mapping(("calibration", "ctx", "chunks", "min_expert_tokens", "require_coverage", "format"))
    defaults = ImatrixSpec()
    fmt = m["format"].str() if "format" in m else defaults.format
    if fmt not in ("gguf", "dat"):
        raise m["format"].fail(f"unknown format {fmt!r}; use gguf (llama.cpp's default) or dat (the legacy format)")
    return ImatrixSpec(
        calibration=m["calibration"].path_value(base, must_exist=True) if "calibration" in m else None,
        ctx=m["ctx"].int(minimum=16, maximum=MAX_CTX) if "ctx" in m else defaults.ctx,
        chunks=m["chunks"].int(minimum=1, maximum=1_000_000) if "chunks" in m else None,
        min_expert_tokens=(m["min_expert_tokens"].int(minimum=0, maximum=2**31 - 1) if "min_expert_tokens" in m
                           else defaults.min_expert_tokens),
        require_coverage=m["require_coverage"].bool() if "require_coverage" in m else False,
        format=fmt,
    )


def _toolchain(n: _Node, base: Path) -> ToolchainSpec:
    m = n.mapping(("llama_cpp_bin", "backend"))
    backend = m["backend"].str() if "backend" in m else None
    if backend is not None and backend not in BACKENDS:
        raise m["backend"].fail(f"{backend!r}: use one of {', '.join(BACKENDS)} "
                                "(the llama.cpp build the tools must be)")
    return ToolchainSpec(llama_cpp_bin=m["llama_cpp_bin"].path_value(base) if "llama_cpp_bin" in m else None,
                         backend=backend)


# ---------------------------------------------------------------- entry point

TOP_LEVEL = ("model", "source", "workspace", "quants", "hub", "card", "bench", "toolchain", "imatrix")


COLLECTION_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}


def _plain_tags_only(root: _Node) -> None:
    """Refuse any YAML tag on a list or mapping (`!!python/tuple`, `!!set`, `!!omap`), wherever it stands; scalars
    are checked where they are read. Each node is visited once, however many aliases name it."""
    seen: set[int] = set()
    todo = [root]
    while todo:
        n = todo.pop()
        if id(n.node) in seen or isinstance(n.node, yaml.ScalarNode):
            continue
        seen.add(id(n.node))
        if n.node.tag != COLLECTION_TAGS[type(n.node)]:
            raise n.fail(f"the YAML tag {n.node.tag!r} is not allowed; write a plain "
                         f"{'mapping' if isinstance(n.node, yaml.MappingNode) else 'list'}")
        if isinstance(n.node, yaml.SequenceNode):
            todo += [_Node(n.file, item, n.child_path(i)) for i, item in enumerate(n.node.value)]
        else:
            todo += [_Node(n.file, value, n.child_path(str(getattr(key, "value", "?"))))
                     for key, value in n.node.value]


def load_pipeline(path: Path) -> Pipeline:
    """Read and validate a pipeline file; raise ConfigError naming file, line and key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: pipeline file not found; pass --config with the path to your pipeline.yaml")
    text = read_text_limited(path, MAX_PIPELINE_BYTES, "pipeline file", ConfigError)
    try:
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{path}:{line}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}:1: not valid YAML: {exc}") from None
    if root_node is None:
        raise ConfigError(f"{path}:1: the pipeline file is empty; start from examples/tiny-phimoe.yaml")
    base = path.resolve().parent
    root = _Node(path, root_node, "")
    _plain_tags_only(root)
    top = root.mapping(TOP_LEVEL, required=("model", "source", "quants", "hub"))
    model = _model(top["model"])
    source = _source(top["source"], base)
    quant_nodes = top["quants"].list()
    if not quant_nodes:
        raise top["quants"].fail("the ladder is empty; list at least one quant, e.g. - type: Q8_0")
    quants: list[QuantSpec] = []
    for node in quant_nodes:
        quant = _quant(node, base, model)
        if any(q.type == quant.type for q in quants):
            raise node.fail(f"{quant.type} appears twice in the ladder")
        clash = next((q for q in quants if q.file.lower() == quant.file.lower()), None)
        if clash is not None:
            raise node.fail(f"output file {quant.file!r} collides with {clash.type}'s {clash.file!r}; give each "
                            "quant its own file name")
        quants.append(quant)
    workspace = top["workspace"].path_value(base) if "workspace" in top else base / "work"
    if workspace.exists() and not workspace.is_dir():
        raise (top["workspace"] if "workspace" in top else top["model"]).fail(
            f"{workspace} is a file, not a folder; point workspace at a folder (it is made when missing)")
    return Pipeline(
        path=path, model=model, source=source, workspace=workspace, quants=tuple(quants),
        hub=_hub(top["hub"], model, tuple(quants)),
        card=_card(top["card"], base) if "card" in top else CardSpec(),
        bench=_bench(top["bench"], base) if "bench" in top else BenchSpec(),
        toolchain=_toolchain(top["toolchain"], base) if "toolchain" in top else ToolchainSpec(),
        imatrix=_imatrix(top["imatrix"], base) if "imatrix" in top else ImatrixSpec(),
    )

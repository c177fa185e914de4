"""pipeline.yaml -> a typed, validated Pipeline: one reader per section, each taking its allowed keys and
defaults from its dataclass (spec.py).

Every problem is refused with `FILE:LINE: key.path: what is wrong`. Unknown keys, duplicate keys, wrong
types, unknown quant types, bad repo ids and unsafe relative names are all errors, never warnings.

    pipeline = load_pipeline(Path("examples/tiny-phimoe.yaml"))
    [q.type for q in pipeline.quants]
    # -> ['Q8_0', 'Q4_K_M', 'Q2_K']
"""

from __future__ import annotations

import dataclasses
import re
import string
from pathlib import Path
from typing import Any, Callable

import yaml
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import ByteSize, TypeAdapter, ValidationError

from moeq import quant_types
from moeq.config.spec import (MAX_COMPARED, CompareSpec, DEFAULT_FILE_TEMPLATE, DEFAULT_REPO_TEMPLATE, DEFAULT_SINGLE_REPO, IMATRIX_AUTO, Layout, BudgetKind,
                              BUDGET_PLACEMENTS, MAX_CTX, MAX_EXTRA_VALUES, MAX_PIPELINE_BYTES, MAX_TIMEOUT_S,
                              RECIPE_SEARCH, REPO_TEMPLATE_FIELDS, SOURCE_KINDS, SYNTH_ARCHS, SYNTH_MAX, UNQUANTIZED,
                              BenchSpec, Budget, CardSpec, HubSpec, ImatrixSpec, ModelSpec, PerplexitySpec, Pipeline,
                              QuantSpec, RecipeSpec, SourceSpec, SynthSpec, ToolchainSpec, keys_of, render_repo_id,
                              repo_name)
from moeq.config.yaml_nodes import MAX_NAME, PORTABLE_NAME, Node, first_sentence, require_plain_tags
from moeq.errors import ConfigError, InputError
from moeq.gguf_header import SPLIT_NAME_RE
from moeq.recipe_file import pattern_problem, read_recipe, search_problem
from moeq.offload import MODE_HINT, is_setting
from moeq.toolchain import BACKENDS
from moeq.workspace import read_text_limited

TOP_LEVEL = keys_of(Pipeline, leave_out=("path",))


def _plain(n: Node, budget: list[int]) -> Any:
    """A YAML subtree as plain JSON-able values: strings, finite numbers, booleans, null, lists, mappings.

    `budget` counts the values left: aliases can expand a small file into billions of values."""
    budget[0] -= 1
    if budget[0] < 0:
        raise n.fail(f"more than {MAX_EXTRA_VALUES} values (YAML aliases expand?)", "keep card.extra small")
    if isinstance(n.node, yaml.SequenceNode):
        return [_plain(item, budget) for item in n.list()]
    if isinstance(n.node, yaml.MappingNode):
        if n.node.tag != "tag:yaml.org,2002:map":
            raise n.fail(f"the YAML tag {n.node.tag!r} is not allowed", "write a plain mapping")
        out: dict[str, Any] = {}
        lines: dict[str, int] = {}
        for key_node, value_node in n.node.value:
            key = Node(n.file, key_node, n.path).str()
            child = Node(n.file, value_node, n.child_path(key))
            if key in out:
                raise Node(n.file, key_node, n.child_path(key)).fail(f"duplicate key (first at line {lines[key]})")
            lines[key] = key_node.start_mark.line + 1
            out[key] = _plain(child, budget)
        return out
    return n.scalar()


def _model(n: Node) -> ModelSpec:
    m = n.mapping(keys_of(ModelSpec), required=("name", "base_model", "license", "quantized_by"))
    base_model = _repo_id(m["base_model"])
    languages: tuple[str, ...] = ("en",)
    if "languages" in m:
        items = m["languages"].list()
        if not items:
            raise m["languages"].fail("an empty list", "list at least one language code, e.g. [en]")
        languages = tuple(item.str() for item in items)
    name = m["name"].str()
    if len(name) > MAX_NAME:
        raise m["name"].fail(f"a name of {len(name)} characters", f"keep it to {MAX_NAME}")
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


def _repo_id(n: Node) -> str:
    value = n.str()
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise n.fail(f"{value!r} is not a valid Hub repo id ({first_sentence(exc)})") from None
    if value.count("/") != 1:
        raise n.fail(f"{value!r} must be 'namespace/name'")
    return value


def _synth(n: Node) -> SynthSpec:
    m = n.mapping(keys_of(SynthSpec))
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


def _source(n: Node, base: Path) -> SourceSpec:
    m = n.mapping(keys_of(SourceSpec), required=("kind",))
    kind = m["kind"].str()
    if kind not in SOURCE_KINDS:
        raise m["kind"].fail(f"unknown source kind {kind!r}", f"use one of {', '.join(SOURCE_KINDS)}")
    needs = {"hf": ("repo", "revision"), "gguf": ("repo", "revision", "file"), "local": ("path",), "synth": ()}
    allowed_extra = {"hf": ("repo", "revision"), "gguf": ("repo", "revision", "file"),
                     "local": ("path",), "synth": ("synth", "train", "arch")}
    for key in needs[kind]:
        if key not in m:
            raise n.fail(f"source kind {kind!r} needs {key!r}")
    for key in m:
        if key != "kind" and key not in allowed_extra[kind]:
            raise m[key].fail(f"not used by source kind {kind!r}", "remove it")
    given = _given(m, {"repo": _repo_id, "revision": Node.str, "file": Node.relative_name,
                       "path": lambda node: node.path_value(base), "synth": _synth, "train": Node.bool})
    if kind == "synth":
        given.setdefault("synth", SynthSpec())
    return SourceSpec(kind=kind, arch=_synth_arch(m), **given)


def _given(m: dict[str, Node], readers: dict[str, Callable[[Node], Any]]) -> dict[str, Any]:
    """The values a section gives, each read by its reader; a key left out takes its dataclass's default."""
    return {key: read(m[key]) for key, read in readers.items() if key in m}


def _synth_arch(m: dict) -> str:
    if "arch" not in m:
        return SourceSpec.arch
    arch = m["arch"].str()
    if arch not in SYNTH_ARCHS:
        raise m["arch"].fail(f"unknown synth architecture {arch!r}", f"use one of {', '.join(SYNTH_ARCHS)}")
    if arch != "phimoe" and "train" in m and m["train"].bool():
        raise m["train"].fail("only the phimoe model is trained (transformers' PhimoeForCausalLM)",
                              f"{arch} is made with random weights: remove train")
    return arch


def _ggml_type(n: Node) -> str:
    value = n.str()
    found = quant_types.lookup_ggml_type(value)
    if found is None:
        raise n.fail(f"unknown tensor type {value!r}", "use a ggml type such as q8_0, q6_K, q4_K, f16")
    return found.name.lower()


def _check_pattern(pattern: str, where: Node) -> None:
    """A tensor_types pattern moeq and llama-quantize match in bounded time (moeq.recipe_file.pattern_problem)."""
    problem = pattern_problem(pattern)
    if problem is not None:
        raise where.fail(problem)


def _quant(n: Node, base: Path, model: ModelSpec) -> QuantSpec:
    if isinstance(n.node, yaml.ScalarNode):  # "- Q8_0" shorthand
        m = {"type": n}
    else:
        m = n.mapping(keys_of(QuantSpec), required=("type",))
    type_node = m["type"]
    raw_type = type_node.str()
    known = quant_types.lookup(raw_type)
    if known is None:
        raise type_node.fail(f"unknown quant type {raw_type!r}",
                             f"llama-quantize accepts {', '.join(quant_types.QUANT_TYPES)}")
    if known.name in UNQUANTIZED:
        raise type_node.fail(f"{known.name} is not a quantization", "the ladder lists quant types such as Q8_0, "
                             "Q4_K_M, Q2_K (the F16 source comes from source:)")
    overrides: list[tuple[str, str]] = []
    if "tensor_types" in m:
        tt = m["tensor_types"]
        if not isinstance(tt.node, yaml.MappingNode):
            raise tt.fail("expected a mapping of tensor name -> type, e.g. {attn_v: q8_0}")
        seen: set[str] = set()
        for key_node, value_node in tt.node.value:
            key = Node(n.file, key_node, tt.path).str()
            entry = Node(n.file, value_node, tt.child_path(key))
            _check_pattern(key, entry)
            if key.lower() in seen:
                raise entry.fail("duplicate tensor override")
            seen.add(key.lower())
            overrides.append((key.lower(), _ggml_type(entry)))
    quant_type = known.name
    file = _quant_file(m["file"]) if "file" in m else DEFAULT_FILE_TEMPLATE.format(
        file_stem=model.file_stem, quant=quant_type)
    unreadable = quant_types.unreadable(quant_type)
    if unreadable:
        raise type_node.fail(f"moeq cannot validate a {quant_type} file: {unreadable}",
                             f"leave {quant_type} out of the ladder")
    imatrix = _quant_imatrix(m["imatrix"], base) if "imatrix" in m else None
    if imatrix is None and quant_type in quant_types.REQUIRES_IMATRIX:
        raise m.get("imatrix", m["type"]).fail(
            f"{quant_type} is made only with an importance matrix (llama-quantize refuses it without one)",
            f"give {quant_type} imatrix: auto, or the path of a matrix")
    return QuantSpec(
        type=quant_type,
        imatrix=imatrix,
        tensor_types=tuple(overrides),
        output_tensor_type=_ggml_type(m["output_tensor_type"]) if "output_tensor_type" in m else None,
        token_embedding_type=_ggml_type(m["token_embedding_type"]) if "token_embedding_type" in m else None,
        file=file,
        **_recipe_of(m, quant_type, base),
    )


def _recipe_of(m: dict[str, Node], quant_type: str, base: Path) -> dict:
    """quants[].recipe: search (and its budget: stock, {bpw: B} or {bytes: SIZE}), or the path of a recipe file
    (llama-quantize's --tensor-type-file, applied over the type's mixture)."""
    if "recipe" not in m:
        if "budget" in m:
            raise m["budget"].fail("a budget is for a searched recipe", "add recipe: search")
        return {}
    if m["recipe"].str() != RECIPE_SEARCH:
        if "budget" in m:
            raise m["budget"].fail("a budget is for a searched recipe (recipe: search), not a recipe file")
        path = m["recipe"].path_value(base)
        if not PORTABLE_NAME.fullmatch(path.name) or len(path.name) > MAX_NAME:
            raise m["recipe"].fail(f"{path.name[:80]!r}: a recipe file is published under its name, which has "
                                   "characters a file name on the Hub should not",
                                   "rename it with letters, digits and . _ - +")
        if not path.is_file():
            raise m["recipe"].fail(f"{path}: no such recipe file", "give recipe: search, or the path of a "
                                   f"--tensor-type-file (relative paths start at {base})")
        try:
            read_recipe(path, where=m["recipe"].path)
        except InputError as exc:
            raise m["recipe"].fail(f"{exc.where}: {exc.problem}", exc.fix) from None
        return {"tensor_type_file": path}
    problem = search_problem(quant_type)
    if problem is not None:
        raise m["recipe"].fail(problem, f"remove recipe: search from {quant_type}, or search a rung of those types")
    overrides = [key for key in ("tensor_types", "output_tensor_type", "token_embedding_type") if key in m]
    if overrides:
        raise m[overrides[0]].fail("a searched recipe types every tensor itself",
                                   f"remove {overrides[0]} from {quant_type}, or the recipe")
    return {"recipe": RECIPE_SEARCH, "budget": _budget(m["budget"]) if "budget" in m else Budget()}


def _budget(n: Node) -> Budget:
    if isinstance(n.node, yaml.ScalarNode):
        if n.scalar() != "stock":
            raise n.fail(f"unknown budget {n.scalar()!r}",
                         "use stock, {bpw: 3.2}, {bytes: 24GB} or {gpu: 12GiB, placement: cpu-moe, ctx: 32768}")
        return Budget()
    m = n.mapping(("bpw", "bytes", "gpu", "placement", "ctx"))
    kinds = [k for k in ("bpw", "bytes", "gpu") if k in m]
    if len(kinds) != 1:
        raise n.fail(f"{len(kinds)} kinds of budget",
                     "give one of bpw, bytes or gpu, e.g. {bpw: 3.2} or {gpu: 12GiB, placement: cpu-moe, ctx: 32768}")
    if kinds != ["gpu"] and ("placement" in m or "ctx" in m):
        raise m["placement" if "placement" in m else "ctx"].fail("placement and ctx are for a GPU budget",
                                                                 "give gpu: SIZE, or leave them out")
    if "bpw" in m:
        value = m["bpw"].scalar()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 16:
            raise m["bpw"].fail(f"bits per weight from 1 to 16, got {value!r}")
        return Budget(BudgetKind.BPW, float(value))
    kind = BudgetKind(kinds[0])
    size = parse_size(str(m[kind].scalar()))
    if not size:
        raise m[kind].fail(f"{str(m[kind].scalar())[:40]!r} is not a size", "write it like 24GB or 1.5GiB")
    if kind == BudgetKind.BYTES:
        return Budget(kind, float(size))
    if "placement" not in m or m["placement"].str() not in BUDGET_PLACEMENTS:
        given = f"got {m['placement'].str()[:40]!r}" if "placement" in m else "none given"
        raise (m["placement"] if "placement" in m else n).fail(
            f"a GPU budget needs a placement ({given})",
            f"give placement: {' or '.join(BUDGET_PLACEMENTS)} (cpu-moe: the experts in system RAM)")
    ctx = m["ctx"].int(1, MAX_CTX) if "ctx" in m else 4096
    return Budget(BudgetKind.GPU, float(size), m["placement"].str(), ctx)


def _recipe(n: Node, base: Path) -> RecipeSpec:
    m = n.mapping(keys_of(RecipeSpec))
    return RecipeSpec(**_given(m, {
        "selection": lambda node: node.text_value(base),
        "ctx": lambda node: node.int(minimum=16, maximum=MAX_CTX),
        "chunks": lambda node: node.int(minimum=2, maximum=100_000),
        "layers_per_group": lambda node: node.int(minimum=1, maximum=10_000),
        "max_evals": lambda node: node.int(minimum=1, maximum=100_000)}))


def _quant_imatrix(n: Node, base: Path) -> Path | str | None:
    """`auto` (the imatrix stage's output), `none`, or the path of an importance matrix made elsewhere."""
    value = n.scalar()
    if value is None or value in ("none", False):
        return None
    if value == IMATRIX_AUTO:
        return IMATRIX_AUTO
    return n.path_value(base, must_exist=True)


def _quant_file(n: Node) -> str:
    """A quant's output file: a plain `.gguf` name, so it can be neither a file of the staged repo (README.md,
    moeq-manifest.json) nor another quant's llama-quantize log (`X.gguf.log`) or partial file."""
    value = n.relative_name()
    if "/" in value or not value.lower().endswith(".gguf") or value.lower() == ".gguf":
        raise n.fail(f"{value!r} is not a GGUF file name", "use a plain name ending in .gguf, like 'model-Q8_0.gguf'")
    return value


BYTE_SIZE = TypeAdapter(ByteSize)  # pydantic's: KB, MB, GB decimal (as llama-gguf-split counts), KiB, MiB, GiB binary


def parse_size(text: str) -> int | None:
    """'50GB' -> 50_000_000_000; None when unparseable (at most 40 characters are read: no float overflow)."""
    if len(text) > 40:
        return None
    try:
        return int(BYTE_SIZE.validate_python(text))
    except (ValidationError, ValueError, OverflowError):
        return None


def _hub(n: Node, model: ModelSpec, quants: tuple[QuantSpec, ...]) -> HubSpec:
    m = n.mapping(keys_of(HubSpec), required=("namespace",))
    namespace = m["namespace"].str()
    try:
        validate_repo_id(namespace)
    except HFValidationError:
        raise m["namespace"].fail(f"{namespace!r} is not a valid Hub user or organization name") from None
    if "/" in namespace:
        raise m["namespace"].fail("a namespace is one name, without '/'")
    given = m["layout"].str() if "layout" in m else HubSpec.layout
    if given not in tuple(Layout):
        raise m["layout"].fail(f"{given!r} is not a layout", "use single (one repo for the ladder) or per-quant (a repo per "
                               "quant)")
    layout = Layout(given)
    unused = "repo_template" if layout == Layout.SINGLE else "repo"
    if unused in m:
        raise m[unused].fail(f"not used with hub.layout {layout}",
                             "name the one repo with hub.repo" if layout == Layout.SINGLE
                             else "name each quant's repo with hub.repo_template")
    max_shard = HubSpec.max_shard_size
    if "max_shard_size" in m:
        raw = m["max_shard_size"].scalar()
        parsed = raw if isinstance(raw, int) and not isinstance(raw, bool) else parse_size(str(raw))
        if not parsed or parsed <= 0:
            raise m["max_shard_size"].fail(f"{str(raw)[:40]!r} is not a size", "write e.g. 50GB, 45G or 500MB")
        if parsed < 10**6:
            raise m["max_shard_size"].fail(f"{raw!r} is under 1MB", "llama-gguf-split splits in whole megabytes")
        max_shard = parsed
    spec = HubSpec(
        namespace=namespace, layout=layout,
        private=m["private"].bool() if "private" in m else HubSpec.private,
        create_pr=m["create_pr"].bool() if "create_pr" in m else HubSpec.create_pr,
        max_shard_size=max_shard, push=m["push"].bool() if "push" in m else HubSpec.push,
    )
    if layout == Layout.SINGLE:
        for quant in quants:  # llama.cpp's -hf REPO:TYPE and the Hub's quant label read the type from the name
            if not re.search(re.escape(quant.type) + r"[.-]", quant.file, re.IGNORECASE):
                raise n.fail(f"quants: {quant.type}'s file {quant.file!r} does not carry its quant type",
                             f"in one repo clients pick a quant by name (e.g. {model.file_stem}-{quant.type}.gguf)")
            rest = re.sub(re.escape(quant.type) + r"(?=[.-])", "", quant.file, flags=re.IGNORECASE)
            other = next((t for t in quant_types.QUANT_TYPES if t != quant.type
                          and re.search(re.escape(t) + r"[.-]", rest, re.IGNORECASE)), None)
            if other:
                raise n.fail(f"quants: {quant.type}'s file {quant.file!r} also carries the quant type {other}, so "
                             f"llama.cpp's -hf REPO:{other} could pick it",
                             f"name it e.g. {model.file_stem}-{quant.type}.gguf")
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
        raise (where or m["namespace"]).fail(f"{repo!r} is not a valid repo id ({first_sentence(exc)})") from None
    if not repo.startswith(namespace + "/"):
        raise (where or m["namespace"]).fail(f"{repo!r} is outside the namespace {namespace!r}")
    return dataclasses.replace(spec, repo=repo)


def _per_quant_repos(m: dict, n: Node, spec: HubSpec, model: ModelSpec, quants: tuple[QuantSpec, ...],
                     namespace: str) -> HubSpec:
    template = spec.repo_template
    where = m.get("repo_template", n)
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise where.fail(f"bad template: {exc}") from None
    unknown = names - REPO_TEMPLATE_FIELDS
    if unknown:
        raise where.fail(f"unknown placeholder {{{sorted(unknown)[0]}}}",
                         f"use {', '.join('{' + f + '}' for f in sorted(REPO_TEMPLATE_FIELDS))}")
    if len(quants) > 1 and not names & {"quant", "quant_slug", "quant_lower"}:
        raise where.fail("must contain {quant_slug} (or {quant}) so each quant gets its own repo")
    seen: dict[str, str] = {}
    for quant in quants:
        repo = render_repo_id(spec, model, quant)
        if repo.lower() in seen:
            raise where.fail(f"gives {repo!r} for both {seen[repo.lower()]} and {quant.type}",
                             "each quant needs its own repo, or one push would delete the other's file")
        seen[repo.lower()] = quant.type
        try:
            validate_repo_id(repo)
        except HFValidationError as exc:
            raise where.fail(f"gives {repo!r} for {quant.type}, not a valid repo id ({first_sentence(exc)})") from None
        if not repo.startswith(namespace + "/"):
            raise where.fail(f"gives {repo!r}, outside the namespace {namespace!r}")
    return spec


def _card(n: Node, base: Path) -> CardSpec:
    m = n.mapping(keys_of(CardSpec))
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


def _bench(n: Node, base: Path) -> BenchSpec:
    m = n.mapping(keys_of(BenchSpec))
    defaults = BenchSpec()
    modes = defaults.modes
    if "modes" in m:
        modes_list = []
        for item in m["modes"].list():
            value = item.scalar()
            if is_setting(value):
                modes_list.append(str(value))
            else:
                raise item.fail(f"unknown mode {value!r}", MODE_HINT)
        modes = tuple(modes_list)
    ppl = defaults.perplexity
    if "perplexity" in m:
        p = m["perplexity"].mapping(keys_of(PerplexitySpec))
        ppl = PerplexitySpec(
            text=p["text"].text_value(base) if "text" in p else None,
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


def _rpc(n: Node) -> str:
    value = n.str()
    if value != "local" and not re.fullmatch(r"[\w.\-]+:\d{1,5}", value):
        raise n.fail(f"{value!r} is not HOST:PORT", "use e.g. 127.0.0.1:50052, or local to start a ggml-rpc-server")
    return value


def _imatrix(n: Node, base: Path) -> ImatrixSpec:
    m = n.mapping(keys_of(ImatrixSpec))
    if "format" in m and m["format"].str() not in ("gguf", "dat"):
        raise m["format"].fail(f"unknown format {m['format'].str()!r}",
                               "use gguf (llama.cpp's default) or dat (the legacy format)")
    return ImatrixSpec(**_given(m, {
        "calibration": lambda node: node.text_value(base),
        "ctx": lambda node: node.int(minimum=16, maximum=MAX_CTX),
        "chunks": lambda node: node.int(minimum=1, maximum=1_000_000),
        "min_expert_tokens": lambda node: node.int(minimum=0, maximum=2**31 - 1),
        "require_coverage": Node.bool, "format": Node.str}))


def _toolchain(n: Node, base: Path) -> ToolchainSpec:
    m = n.mapping(keys_of(ToolchainSpec))
    if "backend" in m and m["backend"].str() not in BACKENDS:
        raise m["backend"].fail(f"{m['backend'].str()!r} is not a llama.cpp backend",
                                f"use one of {', '.join(BACKENDS)} (the llama.cpp build the tools must be)")
    return ToolchainSpec(**_given(m, {"llama_cpp_bin": lambda node: node.path_value(base), "backend": Node.str,
                                      "quantize_silence_s": lambda node: node.int(minimum=60, maximum=86_400)}))


def _compare(n: Node, quality: bool) -> tuple[CompareSpec, ...]:
    """compare: the other publishers' GGUFs of the model, each {repo, file, revision?, label?}."""
    items = n.list()
    if len(items) > MAX_COMPARED:
        raise n.fail(f"{len(items)} files", f"compare at most {MAX_COMPARED}")
    if items and not quality:
        raise n.fail("files to compare, while bench.quality is false: they are compared on their KL divergence "
                     "against F16", "set bench.quality: true, or remove compare")
    peers: list[CompareSpec] = []
    for item in items:
        m = item.mapping(keys_of(CompareSpec), required=("repo", "file"))
        file = m["file"].relative_name()
        if not file.endswith(".gguf"):
            raise m["file"].fail(f"{file[:80]!r} is not a .gguf file", "name the GGUF file in the repo")
        shard = SPLIT_NAME_RE.match(file.rsplit("/", 1)[-1])
        if shard and int(shard["n"]) != 1:
            raise m["file"].fail(f"{file[:80]!r} is shard {int(shard['n'])} of a split file",
                                 f"name its first shard, {shard['stem']}-00001-of-{shard['total']}.gguf")
        label = m["label"].str() if "label" in m else None
        if label is not None and not (0 < len(label) <= 80 and label.isprintable()):
            raise m["label"].fail("a label is 1 to 80 printable characters")
        revision = m["revision"].str() if "revision" in m else None
        if revision is not None and not (0 < len(revision) <= 200 and revision.isprintable()):
            raise m["revision"].fail("a revision is a commit sha, a branch or a tag")
        peer = CompareSpec(repo=_repo_id(m["repo"]), file=file, revision=revision, label=label)
        if any(p.id == peer.id for p in peers):
            raise item.fail(f"{peer.repo}/{peer.file} is listed twice")
        peers.append(peer)
    return tuple(peers)


def load_pipeline(path: Path) -> Pipeline:
    """Read and validate a pipeline file; raise ConfigError naming file, line and key."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(path, "pipeline file not found", "pass --config with the path to your pipeline.yaml")
    text = read_text_limited(path, MAX_PIPELINE_BYTES, "pipeline file", ConfigError)
    try:
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{path}:{line}", f"not valid YAML: {exc.problem or exc.context}",
                          "fix the YAML at that line") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}:1", f"not valid YAML: {exc}", "fix the YAML") from None
    if root_node is None:
        raise ConfigError(f"{path}:1", "the pipeline file is empty", "start from examples/tiny-phimoe.yaml")
    base = path.resolve().parent
    root = Node(path, root_node, "")
    require_plain_tags(root)
    top = root.mapping(TOP_LEVEL, required=("model", "source", "quants", "hub"))
    model = _model(top["model"])
    source = _source(top["source"], base)
    quant_nodes = top["quants"].list()
    if not quant_nodes:
        raise top["quants"].fail("the ladder is empty", "list at least one quant, e.g. - type: Q8_0")
    quants: list[QuantSpec] = []
    for node in quant_nodes:
        quant = _quant(node, base, model)
        if any(q.type == quant.type for q in quants):
            raise node.fail(f"{quant.type} appears twice in the ladder")
        clash = next((q for q in quants if q.file.lower() == quant.file.lower()), None)
        if clash is not None:
            raise node.fail(f"output file {quant.file!r} collides with {clash.type}'s {clash.file!r}",
                            "give each quant its own file name")
        quants.append(quant)
    workspace = top["workspace"].path_value(base) if "workspace" in top else base / "work"
    if workspace.exists() and not workspace.is_dir():
        raise (top["workspace"] if "workspace" in top else top["model"]).fail(f"{workspace} is a file, not a folder",
                                                                              "point workspace at a folder (it is "
                                                                              "made when missing)")
    bench = _bench(top["bench"], base) if "bench" in top else BenchSpec()
    searched = next((node for node, q in zip(quant_nodes, quants) if q.recipe == RECIPE_SEARCH), None)
    if searched is not None and not bench.quality:
        raise top["bench"].mapping(keys_of(BenchSpec))["quality"].fail(
            f"false, while {quants[quant_nodes.index(searched)].type} has recipe: search, which measures every "
            "recipe's KL divergence (without it the search would be skipped)",
            "set bench.quality: true, or remove recipe: search")
    return Pipeline(
        path=path, model=model, source=source, workspace=workspace, quants=tuple(quants),
        hub=_hub(top["hub"], model, tuple(quants)),
        card=_card(top["card"], base) if "card" in top else CardSpec(),
        bench=bench,
        toolchain=_toolchain(top["toolchain"], base) if "toolchain" in top else ToolchainSpec(),
        imatrix=_imatrix(top["imatrix"], base) if "imatrix" in top else ImatrixSpec(),
        recipe=_recipe(top["recipe"], base) if "recipe" in top else RecipeSpec(),
        compare=_compare(top["compare"], bench.quality) if "compare" in top else (),
    )

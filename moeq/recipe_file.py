"""Recipe files: llama-quantize's `--tensor-type-file` format, as the pinned build reads it.

The file is REGEX=TYPE items separated by spaces or newlines. llama-quantize lowercases each pattern and
searches it (std::regex, not anchored) in every tensor's name; the first item that matches wins, after
--token-embedding-type and --output-tensor-type, which type token_embd and output before any pattern. A
tensor no item names keeps the type's mixture, or the base type with --pure.

    read_recipe(Path("tiny-phimoe-Q2_K_MOEQ.recipe"))
    # -> [('^blk\\.0\\.attn_v\\.weight$', 'Q4_K'), ...]
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from moeq.errors import InputError
from moeq.quant_types import BASE_TENSOR_TYPE

# The types a searched recipe may give a tensor, by bits per weight (ties: the IQ type first): the k-quants and
# IQ types llama.cpp's own mixtures use, and Q8_0. IQ4_NL (Q4_K's size) is only a fallback for short rows there.
SEARCH_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_K",
                "Q5_K", "Q6_K", "Q8_0")
# The tensor types llama-quantize makes only from an importance matrix entry, except for token_embd and output
# (llama-quant.cpp's tensor_requires_imatrix; tests/test_recipe_search.py checks it against the pinned build).
NEEDS_IMATRIX_ENTRY = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
MAX_RECIPE_BYTES = 1 << 20  # a line per tensor of a 1,000-layer model is under a megabyte
MAX_RECIPE_ITEMS = 8192
_TYPES = {t.name for t in gguf.GGMLQuantizationType}
# ggml types no tensor of a model file is quantized to (integer types, F64, the dot-product helpers Q8_1 and Q8_K):
# llama-quantize takes their names and then aborts on an assertion.
NOT_TENSOR_TYPES = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}
TENSOR_TYPES = sorted(_TYPES - NOT_TENSOR_TYPES)

# Tensor patterns (quants[].tensor_types, recipe files) are searched by moeq's `re` and by llama-quantize's
# std::regex, both backtracking engines, in every tensor name (at most 64 bytes in GGUF). They are bounded by
# construction: a short pattern of name characters, escapes of punctuation only (no back-references), at most
# two repetitions (`*`, `+`, `?`; no `{m,n}`), no repeated or nested group and at most four groups, so the work
# per name is polynomial of low degree whatever the pattern.
MAX_PATTERN = 256
MAX_REPEATS = 2
MAX_GROUPS = 4
_PATTERN_CHARS = re.compile(r"[A-Za-z0-9_.*\\\[\]()|+?^$-]+")
QUANTIFIED_GROUP = re.compile(r"\)[*+?]")
# llama-quantize reads a recipe file with `file >> item`: items end at C whitespace, and nothing else.
_C_SPACE = re.compile(r"[ \t\n\v\f\r]+")


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a tensor pattern moeq and llama-quantize match in bounded time; None when it is."""
    if len(pattern) > MAX_PATTERN:
        return f"a pattern of {len(pattern)} characters; keep it to {MAX_PATTERN}"
    shown = repr(pattern[:80])
    if not _PATTERN_CHARS.fullmatch(pattern):
        bad = next(c for c in pattern if not _PATTERN_CHARS.fullmatch(c))
        return (f"{shown} has the character {bad!r}; a tensor pattern uses letters, digits, '_', '-' and the "
                "regex signs . * + ? | ^ $ ( ) [ ] \\")
    # `outside`: the pattern with each escape and each character class as one "x", so only operators are counted
    outside, depth, groups, in_class, escaped = [], 0, 0, False, False
    for c in pattern:
        if escaped:
            if c.isalnum():
                return f"{shown} has '\\{c}'; escape only punctuation, such as '\\.'"
            escaped = False
            outside.append("x")
        elif c == "\\":
            escaped = True
        elif in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            outside.append("x")
        elif c == "(":
            depth, groups = depth + 1, groups + 1
            if depth > 1:
                return f"{shown} nests a group in a group; write the alternatives of one group, e.g. 'ffn_(up|gate)_exps'"
            outside.append(c)
        elif c == ")":
            depth = max(0, depth - 1)
            outside.append(c)
        else:
            outside.append(c)
    plain = "".join(outside)
    if QUANTIFIED_GROUP.search(plain):
        return (f"{shown} repeats a group ('(...)*', '(...)+' or '(...)?'), which llama.cpp's regex engine can take "
                "minutes over; write the alternatives without a quantifier, e.g. 'ffn_(up|gate)_exps'")
    repeats = sum(plain.count(c) for c in "*+?")
    if repeats > MAX_REPEATS:
        return (f"{shown} repeats {repeats} times ('*', '+', '?'); a tensor pattern may repeat at most {MAX_REPEATS} "
                "times, so that matching it stays bounded: name the tensors more plainly, or give several items")
    if groups > MAX_GROUPS:
        return f"{shown} has {groups} groups; use at most {MAX_GROUPS}"
    try:
        re.compile(pattern.lower())
    except re.error as exc:
        return f"{shown} is not a valid pattern ({exc.msg})"
    return None


def read_recipe(path: Path, where: str = "") -> list[tuple[str, str]]:
    """The (pattern, TYPE) items of the recipe file at `path`, in order, split as llama-quantize splits them;
    `where` names the key that gave it. A file that llama-quantize would refuse, misread or run unboundedly is an
    InputError naming the item."""
    where = where or str(path)
    if not path.is_file():
        raise InputError(path, "recipe file not found", f"fix {where}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise InputError(path, f"{path.stat().st_size:,} bytes, more than a recipe file holds ({MAX_RECIPE_BYTES:,})",
                         f"fix {where}")
    data = path.read_bytes()
    if b"\0" in data:
        raise InputError(path, "holds a NUL byte, where llama-quantize would cut an item short",
                         "a recipe file is REGEX=TYPE text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8 text", "a recipe file is REGEX=TYPE lines") from None
    items = []
    for item in _C_SPACE.split(text):
        if not item:
            continue
        if len(items) == MAX_RECIPE_ITEMS:
            raise InputError(path, f"more than {MAX_RECIPE_ITEMS:,} items", "a recipe names each tensor at most once")
        pattern, sep, ggml_type = item.partition("=")
        shown = repr(item[:80])
        if not sep or not pattern:
            raise InputError(path, f"{shown} is not REGEX=TYPE", f"fix the item or {where}")
        if ggml_type.upper() not in TENSOR_TYPES:
            raise InputError(path, f"{shown}: {ggml_type[:20]!r} is not a type a tensor can be quantized to",
                             "use one of Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, F16, ...")
        problem = pattern_problem(pattern)
        if problem is not None:
            raise InputError(path, problem, f"fix the pattern or {where}")  # the problem names the pattern
        items.append((pattern, ggml_type.upper()))
    if not items:
        raise InputError(path, "no REGEX=TYPE item", "a recipe file names the tensors it types")
    return items


def recipe_types(recipe: list[tuple[str, str]], names: list[str]) -> dict[str, str]:
    """Each tensor's type under `recipe` (REGEX=TYPE items in order), as llama-quantize applies
    --tensor-type: the pattern lowercased and searched (not anchored) in the tensor's name, the first
    pattern that matches wins; a tensor no pattern matches is left out (it keeps the base type)."""
    compiled = [(re.compile(pattern.lower()), ggml_type.upper()) for pattern, ggml_type in recipe]
    types = {}
    for name in names:
        match = next((ggml_type for pattern, ggml_type in compiled if pattern.search(name)), None)
        if match is not None:
            types[name] = match
    return types


ENDS = ("token_embd.weight", "output.weight")  # typed by their own llama-quantize flags in a rebuild
FILLER = "TQ1_0"  # what a per-type file's tensors no search needs are made as: the smallest, and the quickest to make


def type_bits(ggml_type: str) -> float:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    return 8 * size / block


def neighbours(ggml_type: str, imatrix: bool, name: str = "", ncols: int | None = None) -> dict[int, str]:
    """The types a searched recipe may give a tensor of this stock type: -1 the next type below it by bits per weight,
    0 itself, 1 the next above (of two the same size, the one of its own family, K or IQ). Only types the tensor can
    take: whose blocks its rows of `ncols` hold, and with no importance matrix (`imatrix` False) none that needs one,
    but for token_embd and output, which never do."""
    iq = ggml_type.startswith("IQ")
    allowed = [t for t in SEARCH_TYPES
               if (imatrix or name in ENDS or t not in NEEDS_IMATRIX_ENTRY)
               and (ncols is None or ncols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] == 0)]
    own = type_bits(ggml_type)
    out = {0: ggml_type}
    for step, side in ((-1, [t for t in allowed if type_bits(t) < own]), (1, [t for t in allowed if type_bits(t) > own])):
        if side:
            nearest = max(side, key=type_bits) if step < 0 else min(side, key=type_bits)
            tied = [t for t in side if type_bits(t) == type_bits(nearest)]
            out[step] = next((t for t in tied if t.startswith("IQ") == iq), tied[0])
    return out


def search_problem(quant: str) -> str | None:
    """Why a rung of `quant` cannot have a searched recipe (None: it can): a search types tensors along SEARCH_TYPES
    from the rung's own mixture, and rebuilds the file with `--pure`, which gives every tensor the base type."""
    base = BASE_TENSOR_TYPE.get(quant.upper())
    if base is None or base not in SEARCH_TYPES:
        return (f"a searched recipe moves tensors along {', '.join(SEARCH_TYPES)}; {quant}'s tensors are "
                f"{base or quant}, which is not among them")
    return None


def pure_ftype(ggml_type: str) -> str:
    """The quant type whose `--pure` file gives every tensor `ggml_type`: IQ2_M for IQ2_S, else the type itself."""
    return ggml_type if BASE_TENSOR_TYPE.get(ggml_type) == ggml_type else next(
        quant for quant, base in BASE_TENSOR_TYPE.items() if base == ggml_type)


def check_recipe(recipe: list[tuple[str, str]], header, recipe_path: Path, model_path: Path) -> None:
    """Refuse a recipe that does not fit the model in `header`: a pattern that matches none of its weight tensors
    (a recipe for another model, or a typo), or a type a tensor's rows cannot hold (llama-quantize would quietly
    type it otherwise)."""
    weights = [t for t in header.tensors if len([d for d in t.shape if d > 1]) >= 2
               and not t.name.endswith("ffn_gate_inp.weight")]  # the router: llama-quantize leaves it as it is
    names = [t.name for t in weights]
    for pattern, _type in recipe:
        if not any(re.search(pattern.lower(), name) for name in names):
            raise InputError(recipe_path, f"{pattern[:80]!r} matches no weight tensor of {model_path.name}",
                             "fix the pattern (llama-quantize searches it in names such as "
                             f"{names[len(names) // 2] if names else 'blk.0.attn_q.weight'})")
    typed = recipe_types(recipe, names)
    for t in weights:
        ggml_type = typed.get(t.name)
        if ggml_type is None:
            continue
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0]
        if t.shape[0] % block:
            raise InputError(recipe_path, f"{t.name} cannot be {ggml_type}: its rows of {t.shape[0]} values are not a "
                             f"multiple of {ggml_type}'s block of {block}", "give it another type")

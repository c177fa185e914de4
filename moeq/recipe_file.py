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

# The types a searched recipe may give a tensor, lowest to highest: the k-quants llama.cpp's own mixes use, and
# Q8_0. (IQ types need an importance matrix entry for every tensor; they are left out.)
SEARCH_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
MAX_RECIPE_BYTES = 1 << 20  # a line per tensor of a 1,000-layer model is under a megabyte
MAX_PATTERN = 300  # what llama.cpp's std::regex runs in bounded time (config's tensor_types rule)
_TYPES = {t.name for t in gguf.GGMLQuantizationType}


def read_recipe(path: Path, where: str = "") -> list[tuple[str, str]]:
    """The (pattern, TYPE) items of the recipe file at `path`, in order; `where` names the key that gave it. A file
    that llama-quantize would refuse or run unboundedly is an InputError naming the item."""
    where = where or str(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found; fix {where}")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise InputError(f"{path}: {path.stat().st_size:,} bytes, more than a recipe file holds "
                         f"({MAX_RECIPE_BYTES:,}); fix {where}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; a recipe file is REGEX=TYPE lines") from None
    items = []
    for item in text.split():
        pattern, sep, ggml_type = item.partition("=")
        shown = item[:80]
        if not sep or not pattern:
            raise InputError(f"{path}: {shown!r} is not REGEX=TYPE; fix the item or {where}")
        if ggml_type.upper() not in _TYPES:
            raise InputError(f"{path}: {shown!r}: unknown tensor type {ggml_type[:20]!r}; use one of "
                             "Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, F16, ...")
        if len(pattern) > MAX_PATTERN or re.search(r"\)[*+?{]", pattern):
            raise InputError(f"{path}: {shown!r}: a pattern of at most {MAX_PATTERN} characters with no quantified "
                             "group (llama-quantize's std::regex backtracks on those); simplify it")
        try:
            re.compile(pattern.lower())
        except re.error as exc:
            raise InputError(f"{path}: {shown!r}: not a regular expression ({exc}); fix the item") from None
        items.append((pattern, ggml_type.upper()))
    if not items:
        raise InputError(f"{path}: no REGEX=TYPE item; a recipe file names the tensors it types")
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


def pure_type(quant: str) -> str | None:
    """The tensor type `--pure` gives every tensor of a `quant` file: Q4_K for Q4_K_M, Q2_K for Q2_K."""
    for name in (quant, re.sub(r"_[SML]$", "", quant)):
        if name in _TYPES:
            return name
    return None


def check_recipe(recipe: list[tuple[str, str]], header, recipe_path: Path, model_path: Path) -> None:
    """Refuse a recipe that does not fit the model in `header`: a pattern that matches none of its weight tensors
    (a recipe for another model, or a typo), or a type a tensor's rows cannot hold (llama-quantize would quietly
    type it otherwise)."""
    weights = [t for t in header.tensors if len([d for d in t.shape if d > 1]) >= 2
               and not t.name.endswith("ffn_gate_inp.weight")]  # the router: llama-quantize leaves it as it is
    names = [t.name for t in weights]
    for pattern, _type in recipe:
        if not any(re.search(pattern.lower(), name) for name in names):
            raise InputError(f"{recipe_path}: {pattern[:80]!r} matches no weight tensor of {model_path.name}; fix "
                             "the pattern (llama-quantize searches it in names such as "
                             f"{names[len(names) // 2] if names else 'blk.0.attn_q.weight'})")
    typed = recipe_types(recipe, names)
    for t in weights:
        ggml_type = typed.get(t.name)
        if ggml_type is None:
            continue
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]][0]
        if t.shape[0] % block:
            raise InputError(f"{recipe_path}: {t.name} cannot be {ggml_type}: its rows of {t.shape[0]} values are "
                             f"not a multiple of {ggml_type}'s block of {block}; give it another type")

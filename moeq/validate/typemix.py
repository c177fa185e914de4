"""Which tensor types llama.cpp's quantization recipe can give each phimoe tensor.

Read from src/llama-quant.cpp of the pinned build (llama_tensor_get_type_impl and
tensor_type_fallback) for the ladder's types; per name category, the set covers every layer
position (use_more_bits), the n_gqa and 8-expert bumps, and the fallback for rows not divisible
by the block size. Other quant types are checked on general.file_type alone.
"""

from __future__ import annotations

import re

import gguf

from moeq.gguf_header import GGUFHeader, TensorInfo

Q = gguf.GGMLQuantizationType
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

# quant -> category -> allowed types; "*" is every other 2-D+ weight.
RECIPES: dict[str, dict[str, set]] = {
    "Q8_0": {"*": {Q.Q8_0}},
    "Q4_K_M": {"output": {Q.Q6_K}, "attn_v": {Q.Q4_K, Q.Q6_K}, "ffn_down_exps": {Q.Q4_K, Q.Q6_K},
               "*": {Q.Q4_K}},
    "Q2_K": {"output": {Q.Q6_K}, "attn_v": {Q.Q3_K, Q.Q4_K}, "ffn_down_exps": {Q.Q3_K},
             "attn_output": {Q.Q3_K}, "*": {Q.Q2_K}},
}


def category(name: str) -> str:
    match = re.match(r"^(?:blk\.\d+\.)?(.+)\.weight$", name)
    return match.group(1) if match else name


def keeps_source_type(t: TensorInfo) -> bool:
    """1-D tensors, norms and the router are never quantized."""
    return len([d for d in t.shape if d > 1]) <= 1 or t.name.endswith("ffn_gate_inp.weight") or ".bias" in t.name


def allowed_types(quant: str, t: TensorInfo, header: GGUFHeader, overrides: dict[str, str]) -> set | None:
    """Types the recipe can give `t`; `overrides` maps name patterns to the types the pipeline asked for."""
    recipe = RECIPES.get(quant)
    if recipe is None:
        return None
    cat = category(t.name)
    allowed = set(recipe.get(cat, recipe["*"]))
    arch = header.metadata.get("general.architecture")
    if quant != "Q8_0" and cat in ("attn_v", "attn_k") and header.metadata.get(f"{arch}.expert_count") == 8:
        allowed.add(Q.Q8_0)  # llama.cpp bumps these for 8-expert models
    for pattern, ggml_type in overrides.items():
        if re.search(pattern, t.name):
            allowed = {Q[ggml_type.upper()]}
    ncols = t.shape[0]
    out = set()
    for wanted in allowed:
        block = gguf.GGML_QUANT_SIZES[wanted][0]
        if ncols % block:
            wanted = FALLBACK.get(wanted, wanted)
            if ncols % gguf.GGML_QUANT_SIZES[wanted][0]:
                wanted = Q.F16
        out.add(wanted)
    return out

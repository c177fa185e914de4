"""Which tensor types llama.cpp's quantization recipe can give each tensor of a MoE model, of any architecture.

Read from src/llama-quant.cpp of the pinned build (tensor_get_category, llama_tensor_get_type_impl and
tensor_type_fallback) for the ladder's types. Tensors fall into llama.cpp's categories by name, as it
matches them (a shared expert's ffn_down_shexp is ffn_down, like ffn_down_exps). Per category, the set
covers every layer position (use_more_bits), the n_gqa bump, llama.cpp's bumps for models of exactly 8
experts (Mixtral's, and any other: attn_v and attn_k to Q8_0, attn_output to Q5_K) and the fallback for
rows not divisible by the block size. The recipe reads the architecture itself only for Falcon, which has
no experts. Other quant types are checked on general.file_type alone.

These tables serve a file checked by path (`moeq validate FILE`); the validate stage asks the pinned
llama-quantize's --dry-run of the source instead, for every type.
"""

from __future__ import annotations

import re

import gguf
from gguf import Keys

from moeq.gguf_header import GGUFHeader, TensorInfo
from moeq.quant_types import BASE_TENSOR_TYPE, row_type

Q = gguf.GGMLQuantizationType

# quant -> category -> allowed types; "*" is every other 2-D+ weight.
RECIPES: dict[str, dict[str, set]] = {
    "Q8_0": {"*": {Q.Q8_0}},
    "Q4_K_M": {"output": {Q.Q6_K}, "attn_v": {Q.Q4_K, Q.Q6_K}, "ffn_down": {Q.Q4_K, Q.Q6_K}, "*": {Q.Q4_K}},
    "Q2_K": {"output": {Q.Q6_K}, "attn_v": {Q.Q3_K, Q.Q4_K}, "ffn_down": {Q.Q3_K}, "attn_output": {Q.Q3_K},
             "*": {Q.Q2_K}},
}
EIGHT_EXPERTS = {"attn_v": {Q.Q8_0}, "attn_k": {Q.Q8_0}, "attn_output": {Q.Q5_K}}  # for Q4_K_M and Q2_K
# llama.cpp's categories in the order it tries them: (category, exact name or substring).
CATEGORIES = (("output", "output.weight", True), ("token_embd", "token_embd.weight", True),
              ("attn_qkv", "attn_qkv.weight", False), ("attn_kv_b", "attn_kv_b.weight", False),
              ("attn_v", "attn_v.weight", False), ("attn_k", "attn_k.weight", False),
              ("attn_q", "attn_q.weight", False), ("attn_output", "attn_output.weight", False),
              ("ffn_up", "ffn_up", False), ("ffn_gate", "ffn_gate", False), ("ffn_down", "ffn_down", False))


def category(name: str) -> str:
    for cat, pattern, exact in CATEGORIES:
        if name == pattern if exact else pattern in name:
            return cat
    return "other"


def keeps_source_type(t: TensorInfo) -> bool:
    """1-D tensors, norms and the router are never quantized."""
    return len([d for d in t.shape if d > 1]) <= 1 or t.name.endswith("ffn_gate_inp.weight") or ".bias" in t.name


def allowed_types(quant: str, t: TensorInfo, header: GGUFHeader, overrides: dict[str, str],
                  ends: dict[str, str] | None = None, pure: bool = False) -> set | None:
    """Types llama-quantize can give `t`: `ends` (token_embd.weight, output.weight: the two end flags) first, then
    the first of `overrides` (pattern -> type, in order: --tensor-type and the recipe file) whose pattern is
    found in its name, then with `pure` the type's base type, else the type's mixture."""
    named = (ends or {}).get(t.name) or next((ggml_type for pattern, ggml_type in overrides.items()
                                               if re.search(pattern.lower(), t.name)), None)
    if named is not None:
        allowed = {Q[named.upper()]}
    elif pure:
        base = BASE_TENSOR_TYPE.get(quant.upper())
        if base is None:
            return None
        allowed = {Q[base]}
    else:
        recipe = RECIPES.get(quant)
        if recipe is None:
            return None
        cat = category(t.name)
        allowed = set(recipe.get(cat, recipe["*"]))
        if quant != "Q8_0" and cat in EIGHT_EXPERTS and header.arch_value(Keys.LLM.EXPERT_COUNT) == 8:
            allowed = set(EIGHT_EXPERTS[cat])
    return {row_type(t.shape[0], wanted) for wanted in allowed}

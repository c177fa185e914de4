"""What an architecture is to moeq, read from gguf-py's own tables and from the model file, never from a list.

An architecture is a mixture of experts to llama.cpp when gguf-py's table of its tensors
(`gguf.MODEL_TENSORS`) holds routed-expert tensors (`ffn_{gate,up,down}_exps`, or `ffn_gate_up_exps`);
a model file is one when it has them and says how many experts it has (`<arch>.expert_count`). Those
tensors are what `--cpu-moe` / `-ncmoe N` keep in system RAM; shared experts (`ffn_*_shexp`, Qwen2-MoE,
DeepSeek) run for every token and stay with their layer on the GPU.

    moe_architectures()[:3]
    # -> ['llama', 'llama4', 'deci']
"""

from __future__ import annotations

import functools
import re

import gguf
from gguf import Keys

from moeq.errors import InputError
from moeq.gguf_header import GGUFHeader

# llama.cpp's --cpu-moe pattern (common/arg.cpp): the routed experts, 2-D per expert, stacked in 3-D.
EXPERT_RE = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")
SHARED_EXPERT_RE = re.compile(r"\.ffn_(up|down|gate)_shexp\.")
_ROUTED = {gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP, gguf.MODEL_TENSOR.FFN_DOWN_EXP,
           getattr(gguf.MODEL_TENSOR, "FFN_GATE_UP_EXP", gguf.MODEL_TENSOR.FFN_UP_EXP)}


@functools.cache
def moe_architectures() -> list[str]:
    """gguf-py's architecture names whose tensors include routed experts, in gguf-py's order."""
    return [gguf.MODEL_ARCH_NAMES[arch] for arch, tensors in gguf.MODEL_TENSORS.items() if _ROUTED & set(tensors)]


def has_shared_experts(header: GGUFHeader) -> bool:
    return any(SHARED_EXPERT_RE.search(t.name) for t in header.tensors)


def require_moe(header: GGUFHeader, where: object) -> str:
    """The file's architecture, when it is a mixture of experts llama.cpp runs; else a one-line InputError saying
    what was found and what is supported."""
    arch = header.architecture
    supported = moe_architectures()
    if not isinstance(arch, str) or not arch:
        raise InputError(where, "no general.architecture key, so not a model llama.cpp can load",
                         "convert the model with llama.cpp's convert_hf_to_gguf.py")
    if arch not in supported:
        known = arch in gguf.MODEL_ARCH_NAMES.values()
        raise InputError(where, f"architecture {arch!r} " + ("has no mixture-of-experts tensors in llama.cpp "
                         "(gguf-py's table of its tensors holds no ffn_*_exps)" if known else "is not one gguf-py "
                         "knows"), f"moeq quantizes MoE models for --cpu-moe: {', '.join(supported)}")
    experts = [t.name for t in header.tensors if EXPERT_RE.search(t.name)]
    count = header.arch_value(Keys.LLM.EXPERT_COUNT)
    if not experts or not isinstance(count, int) or count < 2:
        raise InputError(where, f"a dense {arch} model ({len(experts)} ffn_*_exps tensors, {arch}.expert_count "
                         f"{count!r}): --cpu-moe has no experts to move", "moeq quantizes mixture-of-experts models")
    return arch

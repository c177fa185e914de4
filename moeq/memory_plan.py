"""The memory planner: where each byte of a GGUF goes under llama.cpp's placement rules.

Rules (llama.cpp common/arg.cpp and src/llama-model.cpp, pinned commit):
- the input layer (token_embd) always stays in system RAM;
- with all layers offloaded every other tensor goes to the GPU, the output layer included;
- `--cpu-moe` keeps every tensor matching `\\.ffn_(up|down|gate|gate_up)_(ch|)exps` in system RAM (the routed
  experts of every architecture; shared experts, `ffn_*_shexp`, stay with their layer on the GPU);
- `--n-cpu-moe N` does that only for blocks 0..N-1.
The KV cache lives with its layer: n_layer x ctx x (K width + V width) x bytes per element.

    plan = plan_memory(read_header(Path("model-Q4_K_M.gguf")), ctx_sizes=[4096])
    plan.weights[0].gpu_bytes   # all on the GPU
"""

from __future__ import annotations

import re
from pathlib import Path

from gguf import Keys

from moeq.architectures import EXPERT_RE
from moeq.errors import InputError
from moeq.gguf_header import GGUFHeader
from moeq.offload import OffloadMode
from moeq.records import Fit, MemoryPlan, Placement

BLOCK_RE = re.compile(r"^blk\.(\d+)\.")
INPUT_LAYER = "token_embd.weight"
KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32}
GPU_SIZES_GIB = (8, 12, 16, 24, 48, 80)
DEFAULT_COMPUTE_ALLOWANCE = 1024 * 2**20  # compute buffers, CUDA context and slack; stated, not measured


def on_gpu(name: str, n_cpu_moe: int) -> bool:
    """Whether tensor `name` sits on the GPU with every layer offloaded and the experts of blocks 0..n_cpu_moe-1 in
    system RAM."""
    block = BLOCK_RE.match(name)
    return not (name == INPUT_LAYER or (
        EXPERT_RE.search(name) is not None and block is not None and int(block.group(1)) < n_cpu_moe))


def _split(header: GGUFHeader, n_cpu_moe: int) -> tuple[int, int]:
    gpu = cpu = 0
    for t in header.tensors:
        if on_gpu(t.name, n_cpu_moe):
            gpu += t.n_bytes
        else:
            cpu += t.n_bytes
    return gpu, cpu


def _hparam(header: GGUFHeader, key: str) -> int:
    value = header.arch_value(key)
    if not isinstance(value, int):
        raise InputError(header.path, f"metadata key {key.format(arch=header.architecture)} is missing",
                         "the memory plan needs it")
    return value


def kv_bytes(header: GGUFHeader, ctx: int, kv_type: str = "f16") -> int:
    """K and V of every layer at `ctx`: head_count_kv x the head sizes, which are attention.key_length and
    value_length where the model sets them (Qwen3-MoE: twice embedding_length / head_count), else
    embedding_length / head_count, as llama.cpp reads them."""
    n_layer = _hparam(header, Keys.LLM.BLOCK_COUNT)
    n_embd, n_head = _hparam(header, Keys.LLM.EMBEDDING_LENGTH), _hparam(header, Keys.Attention.HEAD_COUNT)
    n_head_kv = _hparam(header, Keys.Attention.HEAD_COUNT_KV)
    key_length = header.arch_value(Keys.Attention.KEY_LENGTH, n_embd // n_head)
    value_length = header.arch_value(Keys.Attention.VALUE_LENGTH, n_embd // n_head)
    width = (key_length + value_length) * n_head_kv
    return int(n_layer * ctx * width * KV_BYTES_PER_ELEMENT[kv_type])


def plan_memory(header: GGUFHeader, ctx_sizes: list[int] | tuple[int, ...] = (4096,), kv_type: str = "f16",
                gpu_sizes_gib: tuple[int, ...] = GPU_SIZES_GIB,
                compute_allowance: int = DEFAULT_COMPUTE_ALLOWANCE) -> MemoryPlan:
    if kv_type not in KV_BYTES_PER_ELEMENT:
        raise InputError(f"kv type {kv_type!r}", "not a KV cache type", f"use one of {', '.join(KV_BYTES_PER_ELEMENT)}")
    n_layer = _hparam(header, Keys.LLM.BLOCK_COUNT)
    plan = MemoryPlan(file=str(header.path), n_layer=n_layer, kv_type=kv_type, compute_allowance_bytes=compute_allowance)
    for n in range(n_layer + 1):
        gpu, cpu = _split(header, n)
        plan.weights.append(Placement(mode=OffloadMode.for_layers(n, n_layer).name, n_cpu_moe=n, gpu_bytes=gpu,
                                      cpu_bytes=cpu))
    for ctx in ctx_sizes:
        plan.kv_bytes[ctx] = kv_bytes(header, ctx, kv_type)
        for gib in gpu_sizes_gib:
            budget = gib * 2**30
            fit = Fit(gpu_gib=gib, ctx=ctx, n_cpu_moe=None, gpu_bytes=None)
            for n in range(n_layer + 1):
                need = plan.placement(n).gpu_bytes + plan.kv_bytes[ctx] + compute_allowance
                if need <= budget:
                    fit = Fit(gpu_gib=gib, ctx=ctx, n_cpu_moe=n, gpu_bytes=need,
                              advice=OffloadMode.for_layers(n, n_layer).advice)
                    break
            plan.fits.append(fit)
    return plan


def plan_file(path: Path, **kwargs) -> MemoryPlan:
    from moeq.gguf_header import check_extent, read_header

    header = read_header(path)
    check_extent(header)
    return plan_memory(header, **kwargs)

"""A search's budget in bytes (the stock file's, bits per weight, a size, or a GPU's room), and whether the
search can reach it at all: refused before anything is measured when it cannot.

    budget_bytes(quant, stock)   # the stock Q2_K's tensor bytes for budget: stock
"""

from __future__ import annotations

import math
from pathlib import Path

from gguf import Keys

from moeq.config import BudgetKind, QuantSpec
from moeq.errors import InputError
from moeq.gguf_header import read_header
from moeq.memory_plan import DEFAULT_COMPUTE_ALLOWANCE, kv_bytes, on_gpu
from moeq.recipe.search import TYPE_LADDER, Ladder
from moeq.records import QuantizeRecord
from moeq.units import binary_size


def budget_bytes(quant: QuantSpec, stock: QuantizeRecord) -> int:
    budget = quant.budget
    if budget is None or budget.kind in (BudgetKind.STOCK, BudgetKind.GPU):
        return sum(row.bytes_after for row in stock.tensors)
    if budget.kind == BudgetKind.BPW:
        elements = sum(math.prod(row.shape) for row in stock.tensors)
        return int(budget.value * elements / 8)
    return int(budget.value)


def gpu_room(quant: QuantSpec, source: Path) -> tuple[int | None, int]:
    """A GPU budget's room for the tensors on the GPU (the budget less the KV cache at its context and the memory
    plan's compute allowance), and the layers whose experts its placement keeps in system RAM; (None, 0) without
    one."""
    budget = quant.budget
    if budget is None or budget.kind != BudgetKind.GPU:
        return None, 0
    header = read_header(source)
    n_layer = header.arch_value(Keys.LLM.BLOCK_COUNT) or 0
    kv = kv_bytes(header, budget.ctx)
    room = int(budget.value) - kv - DEFAULT_COMPUTE_ALLOWANCE
    if room <= 0:
        raise InputError(f"quants[{quant.type}].budget.gpu", f"{budget.value / 2**30:g} GiB holds no weights: the KV "
                         f"cache at context {budget.ctx:,} ({binary_size(kv)}) and the compute allowance "
                         f"({binary_size(DEFAULT_COMPUTE_ALLOWANCE)}) take it all", "raise gpu or lower ctx")
    return room, n_layer if budget.placement == "cpu-moe" else 0


def require_reachable(quant: QuantSpec, limit: int, fixed: int, sizes: dict, stock_types: dict[str, str],
                      ladder: Ladder) -> None:
    """Refuse, before measuring anything, a budget below what the search can reach: every tensor one type below
    the stock file's (a search moves no tensor further)."""
    reach = fixed + sum(sizes[_down(ladder, name, t)][name] for name, t in stock_types.items())
    if limit < reach:
        lower = "" if quant.type.startswith(TYPE_LADDER[0]) else " or search a lower rung"
        raise InputError(f"quants[{quant.type}].budget", f"{limit:,} bytes, less than any recipe the search makes can "
                         f"weigh (every tensor one type below the stock {quant.type}: {reach:,} bytes)",
                         f"raise the budget{lower}")


class GpuCount:
    """The bytes a recipe puts on the GPU under a GPU budget's placement: the unquantized tensors there, and each
    quantized one there at its type."""

    def __init__(self, stock: QuantizeRecord, stock_types: dict[str, str], sizes: dict, n_cpu_moe: int):
        self.names = [name for name in stock_types if on_gpu(name, n_cpu_moe)]
        self.fixed = sum(row.bytes_after for row in stock.tensors
                         if row.name not in stock_types and on_gpu(row.name, n_cpu_moe))
        self.sizes = sizes

    def bytes(self, types: dict[str, str]) -> int:
        return self.fixed + sum(self.sizes[types[name]][name] for name in self.names)


def _down(ladder: Ladder, name: str, ggml_type: str) -> str:
    moves = ladder.moves(name, ggml_type)
    return moves.get(-1, moves[0])


def require_gpu_reachable(quant: QuantSpec, room: int, gpu: GpuCount, stock_types: dict[str, str],
                          ladder: Ladder) -> None:
    """Refuse, before measuring, a GPU room the search cannot reach: it moves each tensor one type from the stock
    file's, so the weights on the GPU weigh at least what they do one type below it."""
    reach = gpu.bytes({name: _down(ladder, name, t) for name, t in stock_types.items()})
    if reach > room:
        raise InputError(f"quants[{quant.type}].budget", f"{room:,} bytes for the weights on the GPU (after the KV "
                         "cache and the compute allowance), less than the search reaches (every tensor there one type "
                         f"below the stock {quant.type}: {reach:,} bytes)",
                         "raise gpu, lower ctx, use placement: cpu-moe, or search a lower rung")

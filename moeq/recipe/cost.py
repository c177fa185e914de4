"""What a recipe search will cost, from the source's header alone: its tensor groups, its llama-perplexity runs,
the tokens of each run, and the per-type files it keeps on disk.

    plan_search(pipeline, quant, Path("work/source/tiny-phimoe-F16.gguf")).describe()
    # -> '2 tensor groups; up to 6 llama-perplexity runs of 2,048 tokens; 6 --pure quantizations (...), ...'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gguf import Keys

from moeq.config import Pipeline, QuantSpec
from moeq.errors import InputError
from moeq.gguf_header import read_header
from moeq.quant_types import lookup
from moeq.recipe.search import TYPE_LADDER, Group, groups_of

BITS = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5}  # per weight
RUNGS = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")  # the rungs whose --pure base type is on the ladder


def base_type(quant: str) -> str:
    """The tensor type `--pure` gives a rung's tensors: Q4_K for Q4_K_M (the same general.file_type)."""
    name = quant.removesuffix("_M")
    known, own = lookup(name), lookup(quant)
    if name not in TYPE_LADDER or known is None or own is None or known.file_type != own.file_type:
        raise InputError(f"quants[{quant}].recipe", f"a searched recipe is for {', '.join(RUNGS)}, not {quant}",
                         f"remove recipe: search from {quant}")
    return name


@dataclass(frozen=True)
class Plan:
    """What a search will cost, printed before it starts."""

    groups: int
    runs: int  # llama-perplexity runs at most (recipe.max_evals bounds it)
    tokens: int  # tokens each run evaluates
    pure_types: tuple[str, ...]
    pure_bytes: int  # the per-type files, on disk while the search runs
    budget_bytes: int  # 0 when not known yet (a plan from the header alone)

    def describe(self) -> str:
        return (f"{self.groups} tensor groups; up to {self.runs} llama-perplexity runs of {self.tokens:,} tokens; "
                f"{len(self.pure_types)} --pure quantizations ({', '.join(self.pure_types)}), "
                f"{self.pure_bytes / 1e9:.2f} GB on disk while it runs")

    def as_dict(self) -> dict:
        return {"groups": self.groups, "runs": self.runs, "tokens_per_run": self.tokens,
                "pure_types": list(self.pure_types), "pure_bytes": self.pure_bytes, "budget_bytes": self.budget_bytes}


def plan_search(pipeline: Pipeline, quant: QuantSpec, source: Path) -> Plan:
    """The most a search of `quant` costs, from the source's header alone: its groups, llama-perplexity runs
    (recipe.max_evals bounds them), tokens per run, and the per-type files (every type of the ladder at most)."""
    base_type(quant.type)
    header = read_header(source)
    weights = {t.name: t.n_elements for t in header.tensors if len(t.shape) >= 2 and "ffn_gate_inp" not in t.name}
    n_layer = header.arch_value(Keys.LLM.BLOCK_COUNT) or 1
    groups = groups_of({name: TYPE_LADDER[0] for name in weights}, n_layer, layers_per_group(pipeline, n_layer))
    cfg = pipeline.recipe
    return Plan(len(groups), planned_runs(pipeline, groups), cfg.ctx * cfg.chunks, TYPE_LADDER,
                int(sum(weights.values()) * sum(BITS.values()) / 8), 0)


def layers_per_group(pipeline: Pipeline, n_layer: int) -> int:
    """recipe.layers_per_group, or a band per eighth of the model (one layer for a model of up to 8)."""
    return pipeline.recipe.layers_per_group or max(1, math.ceil(n_layer / 8))


def planned_runs(pipeline: Pipeline, groups: list[Group]) -> int:
    """The stock recipe, each group up and down, and the solution: recipe.max_evals at most."""
    return min(pipeline.recipe.max_evals, 2 + 2 * len(groups))

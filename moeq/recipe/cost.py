"""What a recipe search will cost, from the source's header and llama-quantize's dry run alone: its tensor groups,
its llama-perplexity runs, the tokens of each run, and the per-type files it keeps on disk.

    plan_search(pipeline, quant, Path("work/source/tiny-phimoe-F16.gguf"), tool).describe()
    # -> '16 tensor groups; up to 34 llama-perplexity runs of 2,048 tokens; per-type files of Q2_K, ..., 0.01 GB ...'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from gguf import Keys

from moeq.config import RECIPE_SEARCH, Pipeline, QuantSpec
from moeq.errors import InputError
from moeq.gguf_header import read_header
from moeq.quant_types import BASE_TENSOR_TYPE, mixture
from moeq.recipe.pure import needed_bytes, needed_tensors, union
from moeq.recipe.search import Group, Ladder, groups_of, stepped
from moeq.recipe_file import search_problem


def base_type(quant: str) -> str:
    """The tensor type `--pure` gives a rung's tensors: Q4_K for Q4_K_M, IQ3_S for IQ3_M."""
    problem = search_problem(quant)
    if problem is not None:
        raise InputError(f"quants[{quant}].recipe", problem, f"remove recipe: search from {quant}")
    return BASE_TENSOR_TYPE[quant.upper()]


@dataclass(frozen=True)
class Plan:
    """What a search will cost, printed before it starts."""

    groups: int
    runs: int  # llama-perplexity runs at most: the stock recipe, each group up and down where it can go, the
    # solution (recipe.max_evals bounds them)
    tokens: int  # tokens each run evaluates
    pure_types: tuple[str, ...]
    pure_bytes: int  # the per-type files on disk while it runs, shared by the rungs in `shared_with`
    budget_bytes: int  # 0 when not known yet (a plan from the header alone)
    pure_bytes_alone: int = 0  # what this rung's search alone keeps of them
    shared_with: tuple[str, ...] = ()  # the other searched rungs whose per-type files these are

    def describe(self) -> str:
        shared = (f" (shared with {', '.join(self.shared_with)}; {self.pure_bytes_alone / 1e9:.2f} GB for this rung "
                  "alone)" if self.shared_with else "")
        return (f"{self.groups} tensor groups; up to {self.runs} llama-perplexity runs of {self.tokens:,} tokens; "
                f"per-type files of {', '.join(self.pure_types)}, {self.pure_bytes / 1e9:.2f} GB on disk while it "
                f"runs{shared}")

    def as_dict(self) -> dict:
        return {"groups": self.groups, "runs": self.runs, "tokens_per_run": self.tokens,
                "pure_types": list(self.pure_types), "pure_bytes": self.pure_bytes,
                "pure_bytes_alone": self.pure_bytes_alone, "shared_with": list(self.shared_with),
                "budget_bytes": self.budget_bytes}


def plan_search(pipeline: Pipeline, quant: QuantSpec, source: Path, tool) -> Plan:
    """The most a search of `quant` costs, from the source's header and llama-quantize's `--dry-run` of the stock
    mixtures (`tool`): its groups, llama-perplexity runs, tokens per run, and the per-type files (what every searched
    rung sharing them needs: the same source and importance matrix)."""
    base_type(quant.type)
    header = read_header(source)
    shapes = {t.name: t.shape for t in header.tensors}
    n_layer = header.arch_value(Keys.LLM.BLOCK_COUNT) or 1
    sharing = [q for q in pipeline.quants
               if q.recipe == RECIPE_SEARCH and (q.imatrix is None) == (quant.imatrix is None)]
    stocks = {q.type: mixture(tool.path, source, q.type).types for q in sharing if q.type != quant.type}
    stock = mixture(tool.path, source, quant.type).types
    ladder = Ladder.of(quant.imatrix is not None, shapes)
    own = needed_tensors(stock, base_type(quant.type), ladder)
    shared = union(own, *(needed_tensors(types, base_type(t), ladder) for t, types in stocks.items()))
    groups = groups_of(stock, n_layer, layers_per_group(pipeline, n_layer))
    cfg = pipeline.recipe
    # each file holds the metadata and the unquantized tensors too
    extra = header.data_offset + sum(t.n_bytes for t in header.tensors if t.name not in stock)
    return Plan(len(groups), planned_runs(pipeline, groups, stock, ladder), cfg.ctx * cfg.chunks, tuple(shared),
                needed_bytes(shared, shapes) + len(shared) * extra, 0, needed_bytes(own, shapes) + len(own) * extra,
                tuple(stocks))


def layers_per_group(pipeline: Pipeline, n_layer: int) -> int:
    """recipe.layers_per_group, or a band per eighth of the model (one layer for a model of up to 8)."""
    return pipeline.recipe.layers_per_group or max(1, math.ceil(n_layer / 8))


def planned_runs(pipeline: Pipeline, groups: list[Group], stock: dict[str, str], ladder: Ladder) -> int:
    """The runs a search makes at most: the stock recipe, each group one type up and down where the ladder lets it,
    and the solution; recipe.max_evals at most."""
    moves = sum(stepped(stock, group, step, ladder) is not None for group in groups for step in (1, -1))
    return min(pipeline.recipe.max_evals, 2 + moves)

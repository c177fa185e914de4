"""The recipe search's arithmetic: tensor groups, the options measured for each, and the choice under a budget.

A group is what a recipe types together: one layer's tensor of one category (attn_q, ffn_down_exps, ...; the
experts of a layer are one 3-D tensor, so never one expert), a band of consecutive layers of one category
(recipe.layers_per_group), token_embd or output. Each group has three options around the stock file: as the
stock file types it, one step up the type ladder, one step down (each tensor from its own stock type to the next
type by bits per weight it can take, K or IQ: recipe_file.neighbours). Each
option's effect is measured (the KL divergence on the selection text of the stock recipe with that one group
changed), and its bytes are exact (from the per-type files). Assuming the effects add, the set of options with
the lowest predicted divergence under the budget is found exactly (a knapsack's dynamic program over the groups);
that recipe is then measured, as every recipe the published one rests on is.

    groups = groups_of(stock_types, n_layer=32, layers_per_group=4)
    chosen = solve(options, spare_bytes=0)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from moeq.recipe_file import ENDS, SEARCH_TYPES, neighbours

TYPE_LADDER = SEARCH_TYPES
LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)\.weight$")


@dataclass(frozen=True)
class Group:
    name: str  # blk.0.ffn_down_exps, blk.0-3.attn_q, token_embd, output
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class Option:
    """One group typed one way: `step` -1, 0 or +1 from the stock types; `kld` the measured mean KL divergence of
    the stock recipe with only this group changed (the stock figure for step 0)."""

    group: str
    step: int
    types: tuple[tuple[str, str], ...]  # tensor name, type
    delta_bytes: int
    kld: float
    kld_err: float | None = None
    delta_gpu: int = 0  # the bytes it adds on the GPU (a GPU budget's placement)


@dataclass(frozen=True)
class Ladder:
    """The types each tensor of one source may take in a search: with or without an importance matrix, and the
    length of each tensor's rows (the blocks of a type must divide it)."""

    imatrix: bool
    ncols: dict[str, int]

    def moves(self, name: str, ggml_type: str) -> dict[int, str]:
        return neighbours(ggml_type, self.imatrix, name, self.ncols.get(name))

    @classmethod
    def of(cls, imatrix: bool, shapes: dict[str, list[int]]) -> Ladder:
        return cls(imatrix, {name: shape[0] for name, shape in shapes.items() if shape})


def groups_of(stock: dict[str, str], n_layer: int, layers_per_group: int) -> list[Group]:
    """The groups of the tensors the stock file quantizes (`stock`: name -> type, on the type ladder), in file order
    of their first tensor: per layer band and category, then token_embd and output apart."""
    bands: dict[str, list[str]] = {}
    for name in stock:
        match = LAYER_RE.match(name)
        if match:
            layer, category = int(match.group(1)), match.group(2)
            first = layer - layer % layers_per_group
            last = min(first + layers_per_group, n_layer) - 1
            key = f"blk.{first}.{category}" if first == last else f"blk.{first}-{last}.{category}"
        else:
            key = name.removesuffix(".weight")
        bands.setdefault(key, []).append(name)
    return [Group(key, tuple(names)) for key, names in bands.items()]


def stepped(types: dict[str, str], group: Group, step: int, ladder: Ladder) -> dict[str, str] | None:
    """The group's tensors each one type up (`step` 1) or down (-1) the ladder from its type in `types`; None when
    one cannot move so."""
    out = {}
    for name in group.tensors:
        moved = ladder.moves(name, types[name]).get(step)
        if moved is None:
            return None
        out[name] = moved
    return out


def solve(options: dict[str, list[Option]], spare_bytes: int, stock_kld: float,
          spare_gpu: int | None = None) -> dict[str, Option]:
    """One option per group minimizing the predicted KL divergence (the stock figure plus each chosen option's
    change) with the bytes added no more than `spare_bytes` (negative: bytes to give up), and the GPU bytes added no
    more than `spare_gpu` where a GPU budget gives one; {} when nothing fits. Exact: a dynamic program over the
    groups that keeps, of the partial recipes, every one no other beats at once on bytes, GPU bytes and predicted
    divergence (a knapsack's table, holding only the byte totals that can win), and drops those that cannot fit
    even with every later group at its smallest option. Of equal predictions, the fewest bytes."""
    names = list(options)
    gpu = spare_gpu is not None
    least_bytes, least_gpu = [0] * (len(names) + 1), [0] * (len(names) + 1)
    for i in range(len(names) - 1, -1, -1):
        least_bytes[i] = least_bytes[i + 1] + min(o.delta_bytes for o in options[names[i]])
        least_gpu[i] = least_gpu[i + 1] + min(o.delta_gpu for o in options[names[i]])
    front: list[tuple[int, int, float, tuple[Option, ...]]] = [(0, 0, 0.0, ())]  # bytes, GPU bytes, change, picks
    for i, name in enumerate(names):
        grown = [(added + o.delta_bytes, on_gpu + o.delta_gpu, change + (o.kld - stock_kld), (*picks, o))
                 for added, on_gpu, change, picks in front for o in options[name]]
        front = _undominated([s for s in grown if s[0] + least_bytes[i + 1] <= spare_bytes
                              and (not gpu or s[1] + least_gpu[i + 1] <= spare_gpu)], gpu)
    if not front:
        return {}
    best = min(front, key=lambda s: (s[2], s[0]))
    return dict(zip(names, best[3]))


def _undominated(states: list, gpu: bool) -> list:
    """The states no other state matches or beats on bytes, (with `gpu`) GPU bytes and change all at once."""
    kept: list = []
    fewest = math.inf
    for state in sorted(states, key=lambda s: (s[2], s[0], s[1])):  # by change: a kept state changes no more
        if gpu and any(k[0] <= state[0] and k[1] <= state[1] for k in kept) or not gpu and state[0] >= fewest:
            continue
        kept.append(state)
        fewest = min(fewest, state[0])
    return kept


def predicted(chosen: dict[str, Option], stock_kld: float) -> float:
    return stock_kld + sum(o.kld - stock_kld for o in chosen.values())


def recipe_lines(types: dict[str, str], base: str) -> list[tuple[str, str]]:
    """`--tensor-type` lines for every tensor whose type is not the `--pure` base type, token_embd and output
    aside (--token-embedding-type, --output-tensor-type), in name order. Names are anchored and escaped:
    llama-quantize searches each pattern in the lowercased name, so `output` alone would match attn_output."""
    return [(f"^{re.escape(name)}$", ggml_type.lower()) for name, ggml_type in sorted(types.items())
            if ggml_type != base and name not in ENDS]

"""The recipe search's arithmetic: tensor groups, the options measured for each, and the choice under a budget.

A group is what a recipe types together: one layer's tensor of one category (attn_q, ffn_down_exps, ...; the
experts of a layer are one 3-D tensor, so never one expert), a band of consecutive layers of one category
(recipe.layers_per_group), token_embd or output. Each group has three options around the stock file: as the
stock file types it, one step up the type ladder, one step down (each tensor from its own stock type). Each
option's effect is measured (the KL divergence on the selection text of the stock recipe with that one group
changed), and its bytes are exact (from the per-type files). Assuming the effects add, the cheapest set of
options under the budget is found by Lagrangian relaxation over the groups; that recipe is then measured, as
every recipe the published one rests on is.

    groups = groups_of(stock_types, n_layer=32, layers_per_group=4)
    chosen = solve(options, spare_bytes=0)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The types a searched recipe may give a tensor, lowest to highest: the k-quants llama.cpp's own mixes use, and
# Q8_0. (IQ types need an importance matrix entry for every tensor; they are left out.)
TYPE_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
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


def stepped(types: dict[str, str], group: Group, step: int) -> dict[str, str] | None:
    """The group's tensors each `step` rungs from its type in `types`; None when one would leave the ladder."""
    out = {}
    for name in group.tensors:
        rung = TYPE_LADDER.index(types[name]) + step
        if not 0 <= rung < len(TYPE_LADDER):
            return None
        out[name] = TYPE_LADDER[rung]
    return out


def solve(options: dict[str, list[Option]], spare_bytes: int, stock_kld: float) -> dict[str, Option]:
    """One option per group minimizing the predicted KL divergence (the stock figure plus each chosen option's
    change) with the bytes added no more than `spare_bytes` (negative: bytes to give up). Lagrangian relaxation:
    for a price per byte, each group takes its cheapest option; the price is bisected until the recipe fits. The
    stock option (step 0, nothing added) is always among a group's options. Returns {} when no price fits."""

    def pick(price: float) -> dict[str, Option]:
        return {group: min(opts, key=lambda o: (o.kld - stock_kld) + price * o.delta_bytes)
                for group, opts in options.items()}

    def added(chosen: dict[str, Option]) -> int:
        return sum(o.delta_bytes for o in chosen.values())

    free = pick(0.0)
    if added(free) <= spare_bytes:
        return free
    low, high = 0.0, 1.0
    while added(pick(high)) > spare_bytes:
        high *= 4
        if high > 1e30:
            return {}
    for _ in range(200):
        middle = (low + high) / 2
        if added(pick(middle)) > spare_bytes:
            low = middle
        else:
            high = middle
    return pick(high)


def predicted(chosen: dict[str, Option], stock_kld: float) -> float:
    return stock_kld + sum(o.kld - stock_kld for o in chosen.values())


ENDS = ("token_embd.weight", "output.weight")  # typed by their own llama-quantize flags in a rebuild


def recipe_lines(types: dict[str, str], base: str) -> list[tuple[str, str]]:
    """`--tensor-type` lines for every tensor whose type is not the `--pure` base type, token_embd and output
    aside (--token-embedding-type, --output-tensor-type), in name order. Names are anchored and escaped:
    llama-quantize searches each pattern in the lowercased name, so `output` alone would match attn_output."""
    return [(f"^{re.escape(name)}$", ggml_type.lower()) for name, ggml_type in sorted(types.items())
            if ggml_type != base and name not in ENDS]

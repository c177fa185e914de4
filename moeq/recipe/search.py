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

from moeq.recipe_file import SEARCH_TYPES

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


def solve(options: dict[str, list[Option]], spare_bytes: int, stock_kld: float,
          spare_gpu: int | None = None) -> dict[str, Option]:
    """One option per group minimizing the predicted KL divergence (the stock figure plus each chosen option's
    change) with the bytes added no more than `spare_bytes` (negative: bytes to give up), and the GPU bytes added no
    more than `spare_gpu` where a GPU budget gives one. Lagrangian relaxation: for a price per byte (and per GPU
    byte), each group takes its cheapest option; each price is bisected until the recipe fits. Of every fitting
    recipe the prices gave (and the stock one, when it fits), the lowest predicted is returned: with whole options
    the relaxation can overshoot. The stock option (step 0, nothing added) is always among a group's options.
    Returns {} when nothing fits."""
    best: list[dict[str, Option]] = []

    def fits(chosen: dict[str, Option]) -> bool:
        return (sum(o.delta_bytes for o in chosen.values()) <= spare_bytes
                and (spare_gpu is None or sum(o.delta_gpu for o in chosen.values()) <= spare_gpu))

    def consider(chosen: dict[str, Option]) -> dict[str, Option]:
        if fits(chosen) and (not best or predicted(chosen, stock_kld) < predicted(best[0], stock_kld)):
            best[:] = [chosen]
        return chosen

    def pick(price: float, gpu_price: float) -> dict[str, Option]:
        return consider({group: min(opts, key=lambda o: (o.kld - stock_kld) + price * o.delta_bytes
                                    + gpu_price * o.delta_gpu) for group, opts in options.items()})

    def bytes_fit(chosen: dict[str, Option]) -> bool:
        return sum(o.delta_bytes for o in chosen.values()) <= spare_bytes

    def cheapest(gpu_price: float) -> tuple[float, dict[str, Option]] | None:
        """The lowest price per byte that fits the bytes, at this price per GPU byte."""
        return _bisect(lambda price: pick(price, gpu_price), bytes_fit)

    def gpu_fit(found: tuple[float, dict[str, Option]] | None) -> bool:
        return found is not None and fits(found[1])

    consider({group: next(o for o in opts if o.step == 0) for group, opts in options.items()})
    if spare_gpu is None:
        cheapest(0.0)
    else:
        _bisect(cheapest, gpu_fit)
    return best[0] if best else {}


def _bisect(make, ok):
    """The lowest price >= 0 whose make(price) is ok (prices bisected; ok is assumed to hold from some price on), as
    (price, made); None when no price up to 1e30 makes an ok one."""
    made = make(0.0)
    if ok(made):
        return 0.0, made
    low, high = 0.0, 1.0
    while not ok(make(high)):
        high *= 4
        if high > 1e30:
            return None
    for _ in range(100):
        middle = (low + high) / 2
        if ok(make(middle)):
            high = middle
        else:
            low = middle
    return high, make(high)


def predicted(chosen: dict[str, Option], stock_kld: float) -> float:
    return stock_kld + sum(o.kld - stock_kld for o in chosen.values())


ENDS = ("token_embd.weight", "output.weight")  # typed by their own llama-quantize flags in a rebuild


def recipe_lines(types: dict[str, str], base: str) -> list[tuple[str, str]]:
    """`--tensor-type` lines for every tensor whose type is not the `--pure` base type, token_embd and output
    aside (--token-embedding-type, --output-tensor-type), in name order. Names are anchored and escaped:
    llama-quantize searches each pattern in the lowercased name, so `output` alone would match attn_output."""
    return [(f"^{re.escape(name)}$", ggml_type.lower()) for name, ggml_type in sorted(types.items())
            if ggml_type != base and name not in ENDS]

"""The facts of partials/recipe.md.j2: the searched recipe, what it changed and what it cost."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from moeq.cards.facts.shared import num_text, pm_text, slower_tests, speed_text
from moeq.manifest import Manifest, QuantEntry
from moeq.records import Made


@dataclass
class GroupRow:
    """A group the recipe types otherwise than the stock file."""
    group: str
    from_type: str
    to_type: str
    bytes: str = ""
    kld: str = ""


@dataclass(frozen=True)
class RecipeSpeed:
    stock: str
    recipe: str
    slower: str
    stock_name: str


@dataclass(frozen=True)
class Selection:
    text: str
    ctx: int
    chunks: int


@dataclass(frozen=True)
class GpuBytes:
    room: str
    stock: str
    recipe: str


@dataclass(frozen=True)
class RecipeFacts:
    published: bool
    speed: RecipeSpeed | None
    command: str
    budget: str
    budget_bytes: str
    rows: list[GroupRow]
    selection: Selection
    stock_kld: str
    measured_kld: str
    predicted_kld: str
    stock_bytes: str
    bytes: str
    gpu: GpuBytes | None
    evals: int
    runs: int
    seconds: str
    types: str


def recipe_facts(manifest: Manifest, entry: QuantEntry) -> RecipeFacts | None:
    """The searched recipe: what it changed from the stock file (each group's type, bytes and measured effect on the
    selection text), its file and rebuild command, predicted against measured, and what the search cost."""
    record = entry.records.recipe
    if record is None:
        return None
    stock_eval, chosen = record.evals[0], record.evals[record.chosen]
    by_group = {tensor: g.name for g in record.groups for tensor in g.tensors}
    single = {e.label: e for e in record.evals}
    rows: dict[str, GroupRow] = {}
    for tensor, ggml_type in chosen.changes.items():
        group = by_group.get(tensor, tensor)
        row = rows.setdefault(group, GroupRow(group, record.stock_types[tensor], ggml_type))
        word = "up" if record.types.index(ggml_type) > record.types.index(record.stock_types[tensor]) else "down"
        alone = single.get(f"{group} {word}")
        row.bytes = f"{(alone.tensor_bytes - stock_eval.tensor_bytes) if alone else 0:+,}"
        measured = alone and alone.quality.kld_mean is not None and stock_eval.quality.kld_mean is not None
        row.kld = (f"{alone.quality.kld_mean - stock_eval.quality.kld_mean:+.6f}" if measured
                      else "not measured alone")
    choice = entry.records.choice
    stock, searched = choice.candidates[0], next(c for c in choice.candidates if c.name == Made.SEARCHED)
    speed = None
    if stock.speed is not None and searched.speed is not None:
        speed = RecipeSpeed(stock=speed_text(stock.speed), recipe=speed_text(searched.speed),
                            slower=", ".join(slower_tests(searched.speed, stock.speed)), stock_name=stock.name)
    return RecipeFacts(
        published=entry.searched,
        speed=speed,
        command=shlex.join(record.command), budget=record.budget, budget_bytes=f"{record.budget_bytes:,}",
        rows=sorted(rows.values(), key=lambda r: r.group),
        selection=Selection(record.selection.text, record.selection.ctx, record.selection.chunks),
        stock_kld=pm_text(stock_eval.quality, "kld_mean", 6), measured_kld=pm_text(chosen.quality, "kld_mean", 6),
        predicted_kld=(num_text(record.predicted_kld, 6) if record.predicted_kld is not None
                       else "none: nothing changed" if chosen.label == "stock"
                       else f"none: measured as a single-group change ({chosen.label})"),
        stock_bytes=f"{stock_eval.tensor_bytes:,}", bytes=f"{chosen.tensor_bytes:,}",
        gpu=None if record.gpu_budget_bytes is None else GpuBytes(
            room=f"{record.gpu_budget_bytes:,}", stock=f"{stock_eval.gpu_bytes:,}", recipe=f"{chosen.gpu_bytes:,}"),
        evals=len(record.evals), runs=record.runs, seconds=f"{record.seconds:,.0f}",
        types=", ".join(record.types),
    )

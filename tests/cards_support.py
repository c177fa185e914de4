"""Helpers for the card tests: the example pipeline quantized, validated and carded (the fixtures built from them
are session-wide, in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from moeq import steps
from moeq.config import load_pipeline
from moeq.steps import Context
from moeq.workspace import Workspace

from conftest import pipeline_file

LADDER = ("Q8_0", "Q4_K_M", "Q2_K")
CHARTS = ("images/gpu-memory.png",)  # no bench here, so no quality chart: empty axes are not published


def copy_example(folder: Path, card: dict | None = None, hub: dict | None = None) -> Path:
    """The example pipeline in `folder`, optionally with another card: section or hub (PER_QUANT), and random
    weights: cards are about what the records say, not what the model learned."""
    return pipeline_file(folder, trained=False, **({"card": card} if card else {}), **({"hub": hub} if hub else {}))


def build_until_card(config: Path, validate: tuple[str, ...] = LADDER) -> tuple:
    pipeline = load_pipeline(config)
    ws = Workspace(pipeline.workspace)
    for q in LADDER:
        steps.quantize(Context.of(pipeline), pipeline.quant(q))
    for q in validate:
        steps.validate(Context.of(pipeline), pipeline.quant(q), numerics="sample")
    return pipeline, ws


def make_cards(pipeline, quants: tuple[str, ...] = LADDER, ctx: Context | None = None) -> dict:
    """The cards of the repos `quants` go to, as `moeq card --quant ...` makes them: key (quant, or None for the
    ladder's one repo) -> outcome."""
    ctx = ctx or Context.of(pipeline)
    return {u.quant: steps.card(ctx, u) for u in steps.repo_units(ctx, [pipeline.quant(q) for q in quants])}


def card_text(ws: Workspace, quant: str | None = None) -> str:
    return (ws.repo_dir(quant) / "README.md").read_text()

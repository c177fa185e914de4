"""Helpers for the card tests: the example pipeline quantized, validated and carded (the fixtures built from them
are session-wide, in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from moeq.config import load_pipeline
from moeq.plan import Options, run_to
from moeq.steps.context import Context
from moeq.steps.repos import repo_units
from moeq.workspace import Workspace

from conftest import copy_built, pipeline_file, run_target

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
        run_target(pipeline, "quantize", q)
    for q in validate:
        run_target(pipeline, "validate", q, numerics="sample")
    return pipeline, ws


def ladder_copy(quantized: Path, folder: Path, card: dict | None = None, hub: dict | None = None,
                validate: tuple[str, ...] = LADDER) -> tuple:
    """A copy of the quantized ladder (the `quantized_ladder` fixture's folder) in `folder`, its pipeline given
    another card: or hub: section (neither changes a file), and `validate` validated."""
    copy_built(quantized, folder)
    pipeline = load_pipeline(copy_example(folder, card=card, hub=hub))
    for q in validate:
        run_target(pipeline, "validate", q, numerics="sample")
    return pipeline, Workspace(pipeline.workspace)


def make_cards(pipeline, quants: tuple[str, ...] = LADDER, ctx: Context | None = None) -> dict:
    """The cards of the repos `quants` go to, as `moeq card --quant ...` makes them: key (quant, or None for the
    ladder's one repo) -> outcome."""
    ctx = ctx or Context.of(pipeline)
    asked = [pipeline.quant(q) for q in quants]
    made = run_to(ctx, "card", asked, Options(download=False))
    return {u.quant: made[("card", u.quant)] for u in repo_units(ctx, asked)}


def card_text(ws: Workspace, quant: str | None = None) -> str:
    return (ws.repo_dir(quant) / "README.md").read_text()

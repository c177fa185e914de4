"""The choice's candidates of a rung: which files are made and measured, and how each one is made.

A rung with an importance matrix is made with it and without it (with it alone for a type llama-quantize makes only
with one: IQ2_XXS, ...); a rung with `recipe: search` also with its
searched recipe (TYPE_MOEQ). The stock choice comes first: the file the rung is made as without a choice.
Each candidate lies under WORKSPACE/choice/TYPE/FOLDER/ with its own record, `quantize-TYPE-FOLDER.json`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moeq.config import IMATRIX_AUTO, RECIPE_SEARCH, Pipeline, QuantSpec
from moeq.quant_types import REQUIRES_IMATRIX
from moeq.records import Made, ImatrixRecord, RecipeRecord


def names(quant: QuantSpec) -> list[str]:
    """The candidates of `quant`, the stock choice first: a type llama-quantize makes only with an importance
    matrix (IQ2_XXS) has no candidate without one."""
    if quant.imatrix is None:
        made = [Made.WITHOUT]
    elif quant.type in REQUIRES_IMATRIX:
        made = [Made.WITH]
    else:
        made = [Made.WITH, Made.WITHOUT]
    return made + ([Made.SEARCHED] if quant.recipe == RECIPE_SEARCH else [])


def record_name(quant: QuantSpec, name: str) -> str:
    """The subject candidate `name` of `quant` is recorded under (records/quantize-Q4_K_M-with-imatrix.json)."""
    return f"{quant.type}-{name.folder}"


def output(ws, quant: QuantSpec, name: str) -> Path:
    return ws.choice_dir(quant.type) / name.folder / file_name(quant, name)


def file_name(quant: QuantSpec, name: str) -> str:
    """The file's name: the searched one is labelled TYPE_MOEQ."""
    return quant.searched_file if name == Made.SEARCHED else quant.file


def spec(quant: QuantSpec, name: str, *, imatrix: ImatrixRecord | None = None,
         recipe: RecipeRecord | None = None) -> QuantSpec:
    """How candidate `name` of `quant` is made: with the importance matrix `imatrix` (imatrix: auto) or the one the
    pipeline names; the searched one from the recipe stage's record (--pure, the recipe file, the two end types)."""
    if name == Made.SEARCHED:
        return dataclasses.replace(quant, imatrix=Path(recipe.imatrix.path) if recipe.imatrix else None, pure=True,
                                   tensor_type_file=Path(recipe.recipe_file.path), tensor_types=(),
                                   token_embedding_type=recipe.token_embedding_type.lower(),
                                   output_tensor_type=recipe.output_tensor_type.lower(), recipe=None, budget=None)
    return dataclasses.replace(quant, imatrix=matrix(quant, imatrix) if name == Made.WITH else None)


def matrix(quant: QuantSpec, imatrix: ImatrixRecord | None) -> Path | None:
    """The importance matrix `quant` is made with: the imatrix stage's (imatrix: auto), the pipeline's file, or none."""
    if quant.imatrix == IMATRIX_AUTO:
        return Path(imatrix.output.path)
    return quant.imatrix


def needs_matrix(quant: QuantSpec, name: str) -> bool:
    """Whether candidate `name` is made with the importance matrix the imatrix stage makes."""
    return name == Made.WITH and quant.imatrix == IMATRIX_AUTO


def unchosen(pipeline: Pipeline, quant: QuantSpec, skip_bench: bool = False) -> str:
    """Why `quant` has no choice to make ("" when it has): a quant with an importance matrix or a searched recipe
    has two candidates or more, measured only with bench.quality."""
    if quant.imatrix is None and quant.recipe != RECIPE_SEARCH:
        return "imatrix: none"
    if len(names(quant)) == 1:
        return f"{quant.type} is made only with the importance matrix: nothing to choose between"
    stock = (f"the {'stock ' if quant.recipe == RECIPE_SEARCH else ''}file is made"
             + (" with the importance matrix" if quant.imatrix is not None else ""))
    if not pipeline.bench.quality:
        return f"bench.quality: false; {stock}"
    if skip_bench:
        return f"--skip-bench; {stock}"
    return ""

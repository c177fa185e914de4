"""The three texts moeq ships, what each is for, and the rule that keeps them apart.

    calibration: the importance matrix is made from it (imatrix.calibration; moeq/data/CALIBRATION.md)
    evaluation:  the published quality figures are measured on it (bench.perplexity.text; moeq/bench/EVAL-TEXT.md)
    selection:   the recipe search chooses on it (recipe.selection; moeq/data/SELECTION-TEXT.md)

A recipe chosen on the text its figures are published for would be tuned to that text, so the selection
text shares no line with the other two (`require_selection`).

    texts.evaluation(pipeline)   # -> .../moeq/bench/eval-text.txt unless the pipeline names one
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from moeq.config import Pipeline
from moeq.config.yaml_nodes import MAX_TEXT_BYTES
from moeq.errors import InputError
from moeq.workspace import read_text_limited


def shipped_calibration() -> Path:
    return Path(str(resources.files("moeq.data") / "calibration.txt"))


def shipped_evaluation() -> Path:
    return Path(str(resources.files("moeq.bench") / "eval-text.txt"))


def shipped_selection() -> Path:
    return Path(str(resources.files("moeq.data") / "selection.txt"))


def calibration(pipeline: Pipeline) -> Path:
    return pipeline.imatrix.calibration or shipped_calibration()


def evaluation(pipeline: Pipeline) -> Path:
    return pipeline.bench.perplexity.text or shipped_evaluation()


def selection(pipeline: Pipeline) -> Path:
    return pipeline.recipe.selection or shipped_selection()


def require_selection(pipeline: Pipeline, ctx: int) -> Path:
    """The selection text: long enough for two chunks of `ctx` tokens, and sharing no line with the evaluation
    text (whose figures the search must not have seen) or the calibration text."""
    text = selection(pipeline)
    if text.stat().st_size + 1 < 2 * 2 * ctx:
        raise InputError(text, f"too short for two chunks of {ctx} tokens (recipe.selection)",
                         "use a longer text or a smaller recipe.ctx")
    lines = _lines(text)
    for other, key in ((evaluation(pipeline), "bench.perplexity.text"), (calibration(pipeline), "imatrix.calibration")):
        shared = sorted(lines & _lines(other))
        if shared:
            raise InputError(text, f"shares {len(shared)} line{'s' if len(shared) > 1 else ''} with {other} ({key}), "
                             f"e.g. {shared[0][:60]!r}", "the selection text must be one the published figures and "
                             "the importance matrix were not made from (recipe.selection)")
    return text


def _lines(path: Path) -> set[str]:
    """Its lines of text: 40 characters or more, 20 of them letters or digits (not a table's border)."""
    text = read_text_limited(path, MAX_TEXT_BYTES, "text file of at most 256 MB")
    return {line.strip() for line in text.splitlines()
            if len(line.strip()) >= 40 and sum(c.isalnum() for c in line) >= 20}

"""Formatting shared by the card's sections: Hub links, figures with their uncertainty, speeds, offload modes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeq.cards.render import code
from moeq.offload import OffloadMode
from moeq.records import Fit, PerplexityFigures, SpeedRun, SpeedTest
from moeq.units import binary_size


HUB = "https://huggingface.co"


LLAMA_CPP_REPO = "https://github.com/ggml-org/llama.cpp"


# What each quant of a ladder is for: words, not figures (the figures come from records).
QUANT_ADVICE = {
    "Q8_0": "highest quality of the ladder, close to F16; the largest file",
    "Q6_K": "very close to Q8_0 quality in three quarters of its size",
    "Q5_K_M": "high quality with a clearly smaller file than Q8_0",
    "Q4_K_M": "the usual balance of size and quality",
    "Q3_K_M": "small, with a visible quality loss",
    "Q2_K": "the smallest file, for tight RAM; the largest quality loss",
}


def hub_url(repo_id: str) -> str:
    return f"{HUB}/{repo_id}"


def num_text(value: float | None, digits: int) -> str:
    return "unknown" if value is None else f"{value:.{digits}f}"


def pm_text(figures: PerplexityFigures, key: str, digits: int) -> str:
    """A figure with its uncertainty; llama.cpp prints nan where it cannot compute one (stored as None)."""
    value, err = getattr(figures, key), getattr(figures, key + "_err")
    text = num_text(value, digits)
    if value is None:
        return text
    return text + (f" ± {err:.{digits}f}" if err is not None else " (uncertainty not computed by llama.cpp)")


def ppl_ratio(figures: PerplexityFigures, base: PerplexityFigures) -> str:
    """The file's perplexity over F16's, both as the card shows them (llama-perplexity's own PPL(Q)/PPL(base)
    divides by a PPL(base) recomputed from the saved logits, clamped, which is not the F16 figure shown)."""
    if figures.ppl_q is None or not base.ppl:
        return "unknown"
    return f"{figures.ppl_q / base.ppl:.4f}"


@dataclass(frozen=True)
class Figures:
    """A file's quality figures against the F16, as the card prints them."""
    ppl: str
    ppl_ratio: str
    kld_mean: str
    kld_p99: str
    kld_max: str
    same_top_p: str


def figure_texts(figures: PerplexityFigures, base: PerplexityFigures) -> Figures:
    return Figures(ppl=pm_text(figures, "ppl_q", 4), ppl_ratio=ppl_ratio(figures, base),
                   kld_mean=pm_text(figures, "kld_mean", 6), kld_p99=num_text(figures.kld_p99, 6),
                   kld_max=num_text(figures.kld_max, 6), same_top_p=pm_text(figures, "same_top_p", 2) + " %")


NOISY = 0.25  # a speed whose standard deviation is over this share of its mean is not quoted as a figure


def noisy(test: SpeedTest) -> bool:
    return test.stddev_ts > NOISY * test.avg_ts


def speed_text(run: SpeedRun | None) -> str:
    if run is None:
        return "not measured"
    return "; ".join(f"{t.test} {t.avg_ts:,.0f} ± {t.stddev_ts:,.0f}" + (" (noisy)" if noisy(t) else "")
                     for t in run.tests)


def slower_tests(run: SpeedRun, than: SpeedRun) -> list[str]:
    """The tests `run` is slower in than `than` by more than twice their combined standard deviation."""
    base = {t.test: t for t in than.tests}
    return [t.test for t in run.tests if t.test in base and base[t.test].avg_ts - t.avg_ts
            > 2 * math.hypot(t.stddev_ts, base[t.test].stddev_ts)]


def gpu_label(gibs: list[int], last: bool) -> str:
    if len(gibs) == 1:
        return f"{gibs[0]} GiB"
    return f"{gibs[0]} GiB or more" if last else f"{gibs[0]} to {gibs[-1]} GiB"


def fit_cell(fit: Fit, n_layer: int) -> str:
    if fit.n_cpu_moe is None:
        return "does not fit"
    mode = OffloadMode.for_layers(fit.n_cpu_moe, n_layer)
    return (mode.advice if mode.name == "gpu" else code(mode.advice)) + f" ({binary_size(fit.gpu_bytes)})"


@dataclass(frozen=True)
class Mode:
    """An offload mode as the card names it: its label and the llama.cpp flags that choose it."""
    label: str
    flags: str


def mode_facts(name: str, n_layer: int) -> Mode:
    mode = OffloadMode.from_name(name, n_layer)
    return Mode(mode.label, mode.flags)

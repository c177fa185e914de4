"""The card's two charts, drawn from the records manifest with matplotlib, byte for byte the same for the same
records (so an unchanged card pushes nothing):

1. GPU memory against -ncmoe N (0: all on the GPU ... every layer: --cpu-moe), a line per quant: the weights
   the plan puts on the GPU plus the KV cache at the first configured context; the bench's measured buffers
   (model + KV on the offload device) marked where they exist; common GPU sizes as horizontal lines where
   they fall inside the plot.
2. Quality against size: mean KL divergence against F16 (log scale) against file size, a point per quant,
   a hollow one for the same type made without its importance matrix where both were measured, and a grey
   square for each other publisher's file measured beside them (pipeline compare:).

    [c.path for c in charts(manifest)]
    # -> ['images/gpu-memory.png', 'images/quality-size.png']
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from moeq.manifest import Manifest, QuantEntry
from moeq.records import Candidate, CompareRecord
from moeq.offload import OffloadMode
from moeq.units import binary_size, decimal_size

IMAGES = "images"
WIDTH_IN, HEIGHT_IN, DPI = 8.0, 4.5, 100  # 800 x 450 px: readable in the Hub's card column
GPU_SIZES_GIB = (8, 12, 16, 24, 48, 80)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")
MIB = 2**20


@dataclass(frozen=True)
class Chart:
    path: str  # in the repo: images/NAME.png
    alt: str  # the figures it shows, in words (the same strings the card's tables hold)


def charts(manifest: Manifest) -> list[Chart]:
    """The repo's charts with their alt text (no drawing), each only when it shows something: the memory chart
    when some quant has a memory plan, the quality chart when some quant's KL divergence was measured."""
    out = []
    if _planned(manifest):
        out.append(Chart(f"{IMAGES}/gpu-memory.png", _memory_alt(manifest)))
    if _quality_measured(manifest):
        out.append(Chart(f"{IMAGES}/quality-size.png", _quality_alt(manifest)))
    return out


def _quality_measured(manifest: Manifest) -> list:
    return [q for q in manifest.quants
            if q.records.bench and q.records.bench.quality and q.records.bench.quality.quant.kld_mean is not None]


def draw(manifest: Manifest, chart: Chart) -> bytes:
    """The chart as PNG bytes. matplotlib's warnings (a glyph its font lacks, in a name from the pipeline) are
    not moeq's to print."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _memory_png(manifest) if chart.path.endswith("gpu-memory.png") else _quality_png(manifest)


def _planned(manifest: Manifest) -> list:
    return [q for q in manifest.quants if q.records.validate_ is not None]


def _context(plan) -> int:
    return plan.fits[0].ctx if plan.fits else min(plan.kv_bytes)


def _measured(entry, n_layer: int) -> list[tuple[int, float]]:
    """(N, model + KV MiB on the offload device) for each placement the bench measured."""
    bench = entry.records.bench
    points = []
    for run in bench.memory if bench else []:
        mode = OffloadMode.from_name(run.mode, n_layer)
        if mode.offload:
            points.append((mode.n_cpu_moe, run.device_mib["model"] + run.device_mib["KV"]))
    return sorted(points)


def _memory_alt(manifest: Manifest) -> str:
    words = []
    for entry in _planned(manifest):
        plan = entry.records.validate_.plan
        ctx = _context(plan)
        words.append(f"{entry.quant}: {binary_size(plan.placement(0).gpu_bytes)} of weights on the GPU with every "
                     f"layer there, {binary_size(plan.placement(plan.n_layer).gpu_bytes)} with --cpu-moe, plus "
                     f"{binary_size(plan.kv_bytes[ctx])} of KV cache at context {ctx}"
                     + (", measured on the offload device too" if _measured(entry, plan.n_layer) else ""))
    return "GPU memory against -ncmoe N. " + "; ".join(words)


def _quality_alt(manifest: Manifest) -> str:
    words = []
    for entry in manifest.quants:
        size = decimal_size(sum(f.size for f in entry.files))
        quality = entry.records.bench.quality if entry.records.bench else None
        if quality is None or quality.quant.kld_mean is None:
            words.append(f"{entry.quant} ({size}) not measured")
            continue
        text = f"{entry.quant} ({size}) {quality.quant.kld_mean:.6f}"
        for other in _not_published(entry):
            text += f", {other.quality.kld_mean:.6f} {other.name} ({decimal_size(other.file.size)}, not published)"
        words.append(text)
    for record in _peers(manifest):
        words.append(f"{peer_name(record)} from {record.repo} ({decimal_size(record.size)}) "
                     f"{record.quality.quant.kld_mean:.6f}, another publisher's file")
    return "Mean KL divergence against F16 by file size. " + "; ".join(words)


def peer_name(record: CompareRecord) -> str:
    """What the card calls another publisher's file: its label, else its file name."""
    return record.label or record.repo_file.rsplit("/", 1)[-1]


def measured_peers(manifest: Manifest) -> list[CompareRecord]:
    """The compared files the manifest holds every figure of (a refused one, or one cut short, is left out)."""
    return [r for r in manifest.compared if r.refused is None and None not in (r.quality, r.options, r.tool, r.machine)
            and r.size and r.bpw is not None]


def _peers(manifest: Manifest) -> list[CompareRecord]:
    return [r for r in measured_peers(manifest) if r.quality.quant.kld_mean is not None]


def _not_published(entry: QuantEntry) -> list[Candidate]:
    """The choice's candidates measured beside the published file, each with a mean KL divergence."""
    choice = entry.records.choice
    return [c for c in choice.others() if c.quality.kld_mean is not None] if choice else []


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "moeq", "font.family": "DejaVu Sans", "font.size": 10})
    fig, ax = plt.subplots(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    out = io.BytesIO()
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})  # no version or time stamp: same bytes
    plt.close(fig)
    return out.getvalue()


def _memory_png(manifest: Manifest) -> bytes:
    from matplotlib.ticker import MaxNLocator

    plt, fig, ax = _figure()
    lines = []
    for entry in _planned(manifest):
        plan = entry.records.validate_.plan
        kv = plan.kv_bytes[_context(plan)]
        ys = [(plan.placement(n).gpu_bytes + kv) / MIB for n in range(plan.n_layer + 1)]
        lines.append((entry.quant, ys, _measured(entry, plan.n_layer)))
    top = max(y for _q, ys, _m in lines for y in ys)
    unit, scale = ("GiB", 1024) if top > 2048 else ("MiB", 1)  # a real model's gigabytes read as GiB
    for color, (quant, ys, measured) in zip(COLORS, lines):
        ax.plot(range(len(ys)), [y / scale for y in ys], color=color, marker="o", markersize=3, label=f"{quant} (plan)")
        if measured:
            ax.scatter([m[0] for m in measured], [m[1] / scale for m in measured], s=70, facecolors="none",
                       edgecolors=color, linewidths=1.5, label=f"{quant} (measured)", zorder=3)
    for gib in GPU_SIZES_GIB:
        if gib * 1024 <= top * 1.25:
            ax.axhline(gib * 1024 / scale, color="#888888", linestyle="--", linewidth=0.8)
            ax.text(0, gib * 1024 / scale, f" {gib} GiB GPU", va="bottom", fontsize=8, color="#555555")
    if top * 1.25 < GPU_SIZES_GIB[0] * 1024:
        ax.text(0.99, 0.02, f"every placement fits a {GPU_SIZES_GIB[0]} GiB GPU", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=8, color="#555555")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("-ncmoe N (layers whose experts are in system RAM; the last is --cpu-moe)")
    ax.set_ylabel(f"GPU memory, {unit} (weights + KV cache)")
    ax.set_ylim(bottom=0)
    ax.set_title("GPU memory as expert layers move to system RAM")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def _quality_png(manifest: Manifest) -> bytes:
    plt, fig, ax = _figure()
    for color, entry in zip(COLORS, manifest.quants):
        size = sum(f.size for f in entry.files) / 1e6
        quality = entry.records.bench.quality if entry.records.bench else None
        if quality is None or quality.quant.kld_mean is None:
            continue
        label = entry.label
        ax.errorbar([size], [quality.quant.kld_mean], yerr=[quality.quant.kld_mean_err or 0], fmt="o", color=color,
                    markersize=7, capsize=3, zorder=3, label=label)
        ax.annotate(label, (size, quality.quant.kld_mean), textcoords="offset points", xytext=(6, 4), fontsize=9)
        for other in _not_published(entry):  # each at its own file's size, hollow
            ax.errorbar([other.file.size / 1e6], [other.quality.kld_mean], yerr=[other.quality.kld_mean_err or 0],
                        fmt="o", markersize=7, mfc="none", color=color, capsize=3, zorder=3,
                        label=f"{entry.quant} {other.name} (not published)")
    for record in _peers(manifest):  # another publisher's file: a grey square
        ax.errorbar([record.size / 1e6], [record.quality.quant.kld_mean], yerr=[record.quality.quant.kld_mean_err or 0],
                    fmt="s", color="#555555", markersize=7, capsize=3, zorder=3,
                    label=f"{peer_name(record)} ({record.repo})".replace("$", r"\$"))  # no mathtext from a label
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_xlabel("file size, MB")
    ax.set_ylabel("mean KL divergence against F16")
    ax.set_title("Quality lost against size (± llama-perplexity's uncertainty)")
    ax.grid(True, alpha=0.3, which="both")
    return _png(plt, fig)

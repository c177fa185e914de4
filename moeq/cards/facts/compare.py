"""The facts of partials/compare.md.j2: other publishers' files of the model (pipeline compare:), each beside this
repo's quant of the nearest size, measured on the same text and machine, with the choice's verdict on mean KL
divergence."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from moeq.cards.charts import measured_peers, peer_name
from moeq.cards.facts.measured import machine_text
from moeq.cards.facts.shared import HUB, figure_texts, speed_text
from moeq.kld import compare
from moeq.manifest import Manifest, QuantEntry
from moeq.records import CompareRecord, SpeedRun, TypeShare
from moeq.units import decimal_size

# The choice's rule, said of this repo's file against the other one.
VERDICTS = {"lower": "this repo's file has the lower mean KL divergence against F16, by more than twice the "
                     "combined uncertainty",
            "higher": "the other file has the lower mean KL divergence against F16, by more than twice the combined "
                      "uncertainty",
            "unclear": "the two mean KL divergences against F16 are within twice their combined uncertainty",
            None: "a mean KL divergence is missing, so there is no verdict"}


@dataclass(frozen=True)
class PeerRow:
    figure: str
    theirs: str
    ours: str


@dataclass(frozen=True)
class PeerFacts:
    name: str  # the label, else the file's name
    repo: str
    file: str
    file_url: str  # the file on the Hub at the commit it was measured at
    commit: str
    commit_url: str
    rung: str | None  # this repo's quant it is set beside (None: none of them was measured the same way)
    rows: list[PeerRow]
    verdict: str | None


@dataclass(frozen=True)
class CompareFacts:
    text: str
    ctx: int
    chunks: int
    machine: str
    peers: list[PeerFacts]


def compare_facts(manifest: Manifest) -> CompareFacts | None:
    """Each compared file beside this repo's measured quant nearest to it in size; None without any."""
    measured = measured_peers(manifest)
    if not measured:
        return None
    first = measured[0]
    return CompareFacts(text=first.quality.text, ctx=first.quality.ctx, chunks=first.quality.chunks,
                        machine=machine_text(first, offload=False),
                        peers=[_peer(manifest, record) for record in measured])


def _comparable(entry: QuantEntry, record: CompareRecord) -> bool:
    """The quant was measured as the compared file was: same text and settings, tool and machine."""
    bench = entry.records.bench
    if bench is None or bench.quality is None or bench.quality.quant.kld_mean is None:
        return False
    return (bench.options.perplexity == record.options.perplexity and bench.tool.commit == record.tool.commit
            and bench.machine.same_as(record.machine))


def _cpu(speed: list[SpeedRun]) -> SpeedRun | None:
    return next((run for run in speed if run.mode == "cpu"), None)


def _types(shares: list[TypeShare]) -> str:
    return ", ".join(f"{share.type} ({share.tensors})" for share in shares)


def _size_note(ours: int, theirs: int) -> str:
    """How much larger or smaller this repo's file is, where the two differ by a percent or more."""
    change = round(100 * (ours / theirs - 1)) if theirs > 0 else 0
    return "" if change == 0 else f", at a file {abs(change)} % {'larger' if change > 0 else 'smaller'} than that one"


def _peer(manifest: Manifest, record: CompareRecord) -> PeerFacts:
    sizes = {entry.quant: sum(f.size for f in entry.files) for entry in manifest.quants if _comparable(entry, record)}
    nearest_quant = min(sizes, key=lambda quant: (abs(sizes[quant] - record.size), quant), default=None)
    nearest = manifest.entry(nearest_quant) if nearest_quant is not None else None
    theirs = figure_texts(record.quality.quant, record.quality.base)
    rows = [("File size", decimal_size(record.size)), ("Bits per weight", f"{record.bpw:.2f}"),
            ("Tensor types (tensors)", _types(record.types)), ("Mean KLD", theirs.kld_mean), ("99% KLD", theirs.kld_p99),
            ("Maximum KLD", theirs.kld_max), ("Same top token", theirs.same_top_p),
            ("PPL ratio to F16", theirs.ppl_ratio), ("Tokens/s on the CPU", speed_text(_cpu(record.speed)))]
    ours = [""] * len(rows)
    verdict = None
    if nearest is not None:
        quantized, bench = nearest.records.quantize, nearest.records.bench
        figures = figure_texts(bench.quality.quant, bench.quality.base)
        ours = [decimal_size(sizes[nearest.quant]), f"{quantized.quant_bpw:.2f}",
                _types(quantized.type_shares),
                figures.kld_mean, figures.kld_p99, figures.kld_max, figures.same_top_p, figures.ppl_ratio,
                speed_text(_cpu(bench.speed))]
        verdict = VERDICTS[compare(bench.quality.quant, record.quality.quant)] + _size_note(sizes[nearest.quant],
                                                                                          record.size)
    path = quote(record.repo_file)
    return PeerFacts(
        name=peer_name(record), repo=record.repo, file=record.repo_file,
        file_url=f"{HUB}/{record.repo}/blob/{record.commit}/{path}", commit=record.commit[:12],
        commit_url=f"{HUB}/{record.repo}/tree/{record.commit}", rung=nearest.quant if nearest else None,
        rows=[PeerRow(figure, their, our) for (figure, their), our in zip(rows, ours)], verdict=verdict)

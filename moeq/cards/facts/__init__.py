"""Records manifest -> the typed facts a card template formats.

Every figure is formatted here, once, from a record value; the template only lays them out. A section's
facts sit in the module named after its partial (choose, compare, usage, memory, measured, recipe,
imatrix, validation, prompt, history; made for how the file was made), each a frozen dataclass, its shared formatting in shared.py.
A section whose record is absent is None, and the template says "not measured".

    facts = card_facts(read_manifest(Path("work/repos/Q8_0/moeq-manifest.json")))
    facts.quant.bpw
    # -> '8.50'
"""

from __future__ import annotations

from dataclasses import dataclass

from moeq.cards.charts import charts
from moeq.cards.facts.compare import CompareFacts, compare_facts
from moeq.cards.facts.choose import ChooseFacts, ContextFacts, choose_facts, context_facts
from moeq.cards.facts.history import SupersededRow, UpdateFacts, superseded_rows, update_facts
from moeq.cards.facts.imatrix import ImatrixFacts, imatrix_facts
from moeq.cards.facts.made import ModelFacts, QuantizationFacts, log_flush_facts, model_facts, quantization_facts
from moeq.cards.facts.measured import (BenchError, BenchFacts, MeasuredMemoryFacts, NotMeasuredRow, QualityFacts,
                                        SpeedFacts, bench_facts)
from moeq.cards.facts.memory import MemoryFacts, memory_facts
from moeq.cards.facts.prompt import PromptFacts, prompt_facts
from moeq.cards.facts.recipe import RecipeFacts, recipe_facts
from moeq.cards.facts.shared import LLAMA_CPP_REPO, hub_url
from moeq.cards.facts.usage import FileFacts, SiblingFacts, file_facts, sibling_facts
from moeq.cards.facts.validation import ValidationFacts, validation_facts
from moeq.config import Layout
from moeq.manifest import Manifest, QuantEntry
from moeq.units import decimal_size


TAGS = ("gguf", "quantized", "moe", "mixture-of-experts", "cpu-offload", "text-generation")


@dataclass(frozen=True)
class QuantFacts(FileFacts):
    """One quant of the repo: its files (usage), and each section's facts."""
    memory: MemoryFacts | None
    validation: ValidationFacts | None
    quantization: QuantizationFacts
    imatrix: ImatrixFacts | None
    speed: SpeedFacts | None
    measured_memory: MeasuredMemoryFacts | None
    quality: QualityFacts | None
    bench_errors: list[BenchError]
    bench_not_measured: list[NotMeasuredRow]
    recipe: RecipeFacts | None


@dataclass(frozen=True)
class Link:
    name: str
    url: str


@dataclass(frozen=True)
class ChartLink:
    path: str
    alt: str
    url: str


@dataclass(frozen=True)
class RepoLink:
    id: str
    url: str


@dataclass(frozen=True)
class BuildTool:
    commit: str
    commit_url: str
    log_flush: str | None


@dataclass(frozen=True)
class CardFacts:
    """Everything a card can say (README, "Card facts" lists each field)."""
    generator: str
    frontmatter: dict  # written as YAML, as the Hub reads it
    single: bool
    repo: RepoLink
    model: ModelFacts
    llama_cpp: BuildTool
    quants: list[QuantFacts]
    quant: QuantFacts  # the repo's one quant (per-quant layout), or the ladder's first
    download_total: str  # every GGUF file of the repo's quants
    prompt: PromptFacts | None  # None: no file carries a chat template
    choose: ChooseFacts | None
    compare: CompareFacts | None  # other publishers' files, measured beside this repo's
    context: ContextFacts | None
    charts: list[ChartLink]
    imatrix_files: list[ImatrixFacts]
    siblings: list[SiblingFacts]
    superseded: list[SupersededRow]  # GGUFs an earlier release published, kept under their old names
    updates: list[UpdateFacts]  # what each release changed, newest first
    license_file: Link | None
    extra: dict  # card.extra from the pipeline file: not a record


def card_facts(manifest: Manifest) -> CardFacts:
    """Everything a card can say, from the manifest alone."""
    model_spec = manifest.pipeline.model
    single = manifest.layout == Layout.SINGLE
    quants = [_quant_facts(manifest, entry) for entry in manifest.quants]
    first = manifest.quants[0].records.quantize
    return CardFacts(
        generator=manifest.generator,
        frontmatter={
            "license": model_spec.license,
            "language": list(model_spec.languages),
            "base_model": model_spec.base_model,
            "base_model_relation": "quantized",
            "quantized_by": model_spec.quantized_by,
            "pipeline_tag": "text-generation",
            "tags": [*TAGS, *(q.type for q in quants)],
        },
        single=single,
        repo=RepoLink(manifest.repo_id, hub_url(manifest.repo_id)),
        model=model_facts(model_spec, first.model),
        llama_cpp=BuildTool(first.tool.commit, f"{LLAMA_CPP_REPO}/commit/{first.tool.commit}",
                            log_flush_facts(manifest)),
        quants=quants,
        quant=quants[0],
        download_total=decimal_size(sum(f.size for q in manifest.quants for f in q.files)),
        prompt=prompt_facts(manifest.quants),
        choose=choose_facts(manifest.quants),
        compare=compare_facts(manifest),
        context=context_facts(manifest.quants, first.model.context_length),
        charts=[ChartLink(c.path, c.alt, f"{hub_url(manifest.repo_id)}/resolve/main/{c.path}")
                for c in charts(manifest)],
        imatrix_files=list({q.imatrix.file: q.imatrix for q in quants if q.imatrix}.values()),
        siblings=[sibling_facts(row) for row in manifest.siblings],
        superseded=superseded_rows(manifest),
        updates=update_facts(manifest),
        license_file=Link(manifest.license_file.name,
                          f"{hub_url(manifest.repo_id)}/blob/main/{manifest.license_file.name}")
        if manifest.license_file else None,
        extra=dict(manifest.pipeline.card_extra),
    )


def _quant_facts(manifest: Manifest, entry: QuantEntry) -> QuantFacts:
    records = entry.records
    quantized = records.quantize
    bench: BenchFacts = bench_facts(records.bench, quantized.model.block_count, records.choice)
    return QuantFacts(
        **vars(file_facts(manifest, entry, quantized)),
        memory=memory_facts(records.validate_),
        validation=validation_facts(records.validate_),
        quantization=quantization_facts(quantized, manifest.source),
        imatrix=imatrix_facts(manifest, entry),
        **vars(bench),
        recipe=recipe_facts(manifest, entry),
    )

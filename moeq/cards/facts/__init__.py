"""Records manifest -> the plain dict of facts a card template formats.

Every figure is formatted here, once, from a record value; the template only lays them out. A section's
facts sit in the module named after its partial (choose, usage, memory, measured, recipe, imatrix,
validation; made for how the file was made), its shared formatting in shared.py. A section whose record
is absent is None, and the template says "not measured".

    facts = card_facts(read_manifest(Path("work/repos/Q8_0/moeq-manifest.json")))
    facts["quant"]["bpw"]
    # -> '8.50'
"""

from __future__ import annotations

from moeq.cards.charts import charts
from moeq.cards.facts.choose import choose_facts, context_facts
from moeq.cards.facts.imatrix import imatrix_facts
from moeq.cards.facts.made import log_flush_facts, model_facts, quantization_facts
from moeq.cards.facts.measured import bench_facts
from moeq.cards.facts.memory import memory_facts
from moeq.cards.facts.recipe import recipe_facts
from moeq.cards.facts.shared import LLAMA_CPP_REPO, hub_url
from moeq.cards.facts.usage import file_facts, sibling_facts
from moeq.cards.facts.validation import validation_facts
from moeq.config import Layout
from moeq.manifest import Manifest, QuantEntry


TAGS = ("gguf", "quantized", "moe", "mixture-of-experts", "cpu-offload", "text-generation")


def card_facts(manifest: Manifest) -> dict:
    """Everything a card can say, from the manifest alone."""
    model_spec = manifest.pipeline.model
    single = manifest.layout == Layout.SINGLE
    quants = [_quant_facts(manifest, entry) for entry in manifest.quants]
    first = manifest.quants[0].records.quantize
    return {
        "generator": manifest.generator,
        "frontmatter": {
            "license": model_spec.license,
            "language": list(model_spec.languages),
            "base_model": model_spec.base_model,
            "base_model_relation": "quantized",
            "quantized_by": model_spec.quantized_by,
            "pipeline_tag": "text-generation",
            "tags": [*TAGS, *(q["type"] for q in quants)],
        },
        "single": single,
        "repo": {"id": manifest.repo_id, "url": hub_url(manifest.repo_id)},
        "model": model_facts(model_spec, first.model),
        "llama_cpp": {"commit": first.tool.commit, "commit_url": f"{LLAMA_CPP_REPO}/commit/{first.tool.commit}",
                      "log_flush": log_flush_facts(manifest)},
        "quants": quants,
        "quant": quants[0],  # the repo's one quant (per-quant layout), or the ladder's first
        "choose": choose_facts(manifest.quants),
        "context": context_facts(manifest.quants, first.model.context_length),
        "charts": [{"path": c.path, "alt": c.alt, "url": f"{hub_url(manifest.repo_id)}/resolve/main/{c.path}"}
                   for c in charts(manifest)],
        "imatrix_files": list({q["imatrix"]["file"]: q["imatrix"] for q in quants if q["imatrix"]}.values()),
        "siblings": [sibling_facts(row) for row in manifest.siblings],
        "license_file": {"name": manifest.license_file.name,
                         "url": f"{hub_url(manifest.repo_id)}/blob/main/{manifest.license_file.name}"}
        if manifest.license_file else None,
        "extra": dict(manifest.pipeline.card_extra),
    }


def _quant_facts(manifest: Manifest, entry: QuantEntry) -> dict:
    records = entry.records
    quantized = records.quantize
    return {
        **file_facts(manifest, entry, quantized),
        "memory": memory_facts(records.validate_),
        "validation": validation_facts(records.validate_),
        "quantization": quantization_facts(quantized, manifest.source),
        "imatrix": imatrix_facts(manifest, entry),
        **bench_facts(records.bench, quantized.model.block_count, records.choice),
        "recipe": recipe_facts(manifest, entry),
    }

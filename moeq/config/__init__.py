"""pipeline.yaml: its typed parts (spec.py), the YAML walker that keeps line numbers (yaml_nodes.py), and the
reader of each section (load.py). What the rest of moeq uses is named here.

    pipeline = load_pipeline(Path("examples/tiny-phimoe.yaml"))
    [q.type for q in pipeline.quants]
    # -> ['Q8_0', 'Q4_K_M', 'Q2_K']
"""

from moeq.config.load import TOP_LEVEL, load_pipeline, parse_size
from moeq.config.spec import (IMATRIX_AUTO, MAX_CTX, RECIPE_SEARCH, SEARCHED_SUFFIX, SYNTH_MAX, BenchSpec, Budget,
                              BudgetKind, CompareSpec, Layout,
                              CardSpec, HubSpec, ImatrixSpec, ModelSpec, PerplexitySpec, Pipeline, QuantSpec,
                              RecipeSpec, SourceSpec, SynthSpec, ToolchainSpec, keys_of)

__all__ = ["IMATRIX_AUTO", "MAX_CTX", "RECIPE_SEARCH", "SEARCHED_SUFFIX", "SYNTH_MAX", "TOP_LEVEL", "BenchSpec",
           "Budget", "BudgetKind", "CompareSpec", "Layout", "CardSpec", "HubSpec", "ImatrixSpec", "ModelSpec", "PerplexitySpec", "Pipeline", "QuantSpec",
           "RecipeSpec", "SourceSpec", "SynthSpec", "ToolchainSpec", "keys_of", "load_pipeline", "parse_size"]

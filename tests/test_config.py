"""pipeline.yaml loading: the shipped files load; bad files fail with FILE:LINE: key: message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from moeq.config import load_pipeline, parse_size
from moeq.errors import ConfigError

from conftest import pipeline_file, run_moeq

REPO = Path(__file__).resolve().parent.parent

GOOD = """\
model:
  name: tiny-phimoe
  base_model: microsoft/Phi-3.5-MoE-instruct
  license: mit
  quantized_by: moeq
source:
  kind: synth
quants:
  - type: Q8_0
  - type: Q4_K_M
hub:
  namespace: moeq-test
"""


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    return str(info.value)


def test_shipped_pipelines_load():
    real = load_pipeline(REPO / "pipeline.yaml")
    assert [q.type for q in real.quants] == ["Q8_0", "Q4_K_M", "Q2_K"]
    assert real.model.base_model == "microsoft/Phi-3.5-MoE-instruct"
    assert real.hub.layout == "single" and real.repo_id(real.quants[0]) == "moeq/Phi-3.5-MoE-instruct-GGUF"
    assert "layout: single" in (REPO / "pipeline.yaml").read_text()  # the release's choice is explicit
    assert real.quants[1].file == "phi-3.5-moe-Q4_K_M.gguf"
    assert real.source.kind == "hf"
    tiny = load_pipeline(REPO / "examples" / "tiny-phimoe.yaml")
    assert tiny.source.kind == "synth" and tiny.source.synth.embd == 256
    assert tiny.workspace == (REPO / "examples" / "work")
    assert tiny.bench.modes == ("cpu", "gpu", "cpu-moe", "1")
    assert tiny.hub.layout == "single" and tiny.hub.repo == "moeq-test/tiny-phimoe-GGUF"  # the default layout


@pytest.mark.parametrize("name,expected", [
    ("tiny-phimoe", ["moeq-test/tiny-phimoe-Q8_0-GGUF", "moeq-test/tiny-phimoe-Q4_K_M-GGUF"]),
    ("Qwen3 30B A3B (instruct)", ["moeq-test/Qwen3-30B-A3B-instruct-Q8_0-GGUF",
                                  "moeq-test/Qwen3-30B-A3B-instruct-Q4_K_M-GGUF"]),
])
def test_default_repo_names_come_from_the_model(tmp_path, name, expected):
    """hub.layout per-quant without hub.repo_template: each quant's repo is <Model>-<QUANT>-GGUF, after the model;
    the default layout puts the ladder in one repo, <Model>-GGUF."""
    text = GOOD.replace("name: tiny-phimoe", f"name: {name}")
    p = load_pipeline(write(tmp_path, text + "  layout: per-quant\n"))
    assert [p.repo_id(q) for q in p.quants] == expected
    one = load_pipeline(write(tmp_path, text))
    assert [one.repo_id(q) for q in one.quants] == [expected[0].replace("-Q8_0-GGUF", "-GGUF")] * 2


def test_defaults_and_case_insensitive_types(tmp_path):
    p = load_pipeline(write(tmp_path, GOOD.replace("Q4_K_M", "q4_k_m")))
    assert p.quants[1].type == "Q4_K_M"
    assert p.model.file_stem == "tiny-phimoe"
    assert p.hub.max_shard_size == 50_000_000_000
    assert p.workspace == tmp_path.resolve() / "work"


def test_overrides_are_parsed(tmp_path):
    text = GOOD.replace("  - type: Q4_K_M", "  - {type: Q4_K_M, tensor_types: {attn_v: Q8_0}, output_tensor_type: q6_k}")
    q = load_pipeline(write(tmp_path, text)).quants[1]
    assert q.tensor_types == (("attn_v", "q8_0"),)
    assert q.output_tensor_type == "q6_k"


BAD_CASES = [
    # (name, transform of GOOD, expected message after "FILE:")
    ("unknown top-level key", lambda t: t + "extras: 1\n",
     "13: extras: unknown key; allowed here: model, source, workspace, quants, hub, card, bench, toolchain"),
    ("unknown nested key", lambda t: t.replace("  license: mit", "  license: mit\n  licence: mit"),
     "5: model.licence: unknown key; allowed here: name, base_model, license, languages, quantized_by, file_stem, parameters"),
    ("missing required key", lambda t: t.replace("  quantized_by: moeq\n", ""),
     "2: model: missing required key 'quantized_by'"),
    ("wrong type: list expected", lambda t: t.replace("  - type: Q8_0\n  - type: Q4_K_M\n", "  Q8_0\n"),
     "9: quants: expected a list, got 'Q8_0'"),
    ("wrong type: bool expected", lambda t: t + "  private: maybe\n",
     "13: hub.private: expected true or false, got 'maybe'"),
    ("unknown quant type", lambda t: t.replace("Q4_K_M", "Q9_K"),
     "10: quants[1].type: unknown quant type 'Q9_K'; llama-quantize accepts Q1_0, Q2_0, Q4_0"),
    ("duplicate quant", lambda t: t.replace("Q4_K_M", "q8_0"),
     "10: quants[1]: Q8_0 appears twice in the ladder"),
    ("bad base_model repo id", lambda t: t.replace("microsoft/Phi-3.5-MoE-instruct", "microsoft//Phi--3.5"),
     "3: model.base_model: 'microsoft//Phi--3.5' is not a valid Hub repo id"),
    ("bad namespace", lambda t: t.replace("namespace: moeq-test", "namespace: -bad-"),
     "12: hub.namespace: '-bad-' is not a valid Hub user or organization name"),
    ("absolute source file", lambda t: t.replace("  kind: synth", "  kind: gguf\n  repo: a/b\n  revision: main\n  file: /etc/passwd"),
     "10: source.file: '/etc/passwd' is not a safe relative name; use a plain name like 'model-Q8_0.gguf'"),
    ("dotdot quant file", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, file: ../escape.gguf}"),
     "9: quants[0].file: '../escape.gguf' is not a safe relative name"),
    ("unknown tensor type", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, tensor_types: {attn_v: q9_9}}"),
     "9: quants[0].tensor_types.attn_v: unknown tensor type 'q9_9'"),
    ("unknown source kind", lambda t: t.replace("kind: synth", "kind: s3"),
     "7: source.kind: unknown source kind 's3'; use one of hf, gguf, local, synth"),
    ("hf source without revision", lambda t: t.replace("  kind: synth", "  kind: hf\n  repo: a/b"),
     "7: source: source kind 'hf' needs 'revision'"),
    ("duplicate key", lambda t: t.replace("  license: mit", "  license: mit\n  license: apache-2.0"),
     "5: model.license: duplicate key (first at line 4)"),
    ("repo template placeholder", lambda t: t + "  layout: per-quant\n  repo_template: '{namespace}/{name}-{quant}'\n",
     "14: hub.repo_template: unknown placeholder {name}"),
    ("repo template without quant", lambda t: t + "  layout: per-quant\n  repo_template: '{namespace}/one-repo'\n",
     "14: hub.repo_template: must contain {quant_slug} (or {quant}) so each quant gets its own repo"),
    ("unknown layout", lambda t: t + "  layout: both\n",
     "13: hub.layout: 'both' is not a layout; use single (one repo for the ladder) or per-quant (a repo per quant)"),
    ("repo template in one repo", lambda t: t + "  repo_template: '{namespace}/x-{quant}'\n",
     "13: hub.repo_template: not used with hub.layout single; name the one repo with hub.repo"),
    ("one repo's name per quant", lambda t: t + "  layout: per-quant\n  repo: moeq-test/x\n",
     "14: hub.repo: not used with hub.layout per-quant; name each quant's repo with hub.repo_template"),
    ("one repo outside the namespace", lambda t: t + "  repo: someone/x-GGUF\n",
     "13: hub.repo: 'someone/x-GGUF' is outside the namespace 'moeq-test'"),
    ("one repo with a bad name", lambda t: t + "  repo: moeq-test/x--y\n",
     "13: hub.repo: 'moeq-test/x--y' is not a valid repo id"),
    ("a file without its quant type in one repo", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, file: a.gguf}"),
     "12: hub: quants: Q8_0's file 'a.gguf' does not carry its quant type; in one repo clients pick a quant by name"),
    ("quant file named like the card", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, file: README.md}"),
     "9: quants[0].file: 'README.md' is not a GGUF file name; use a plain name ending in .gguf"),
    ("quant file named like the manifest",
     lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, file: moeq-manifest.json}"),
     "9: quants[0].file: 'moeq-manifest.json' is not a GGUF file name"),
    ("quant file named like another's log", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, file: a.gguf}")
     .replace("  - type: Q4_K_M", "  - {type: Q4_K_M, file: a.gguf.log}"),
     "10: quants[1].file: 'a.gguf.log' is not a GGUF file name"),
    ("quant file in a folder", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, file: sub/a.gguf}"),
     "9: quants[0].file: 'sub/a.gguf' is not a GGUF file name"),
    ("quant file '.'", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, file: .}"),
     "9: quants[0].file: '.' is not a GGUF file name"),
    ("two quant files differing in case", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, file: a.gguf}")
     .replace("  - type: Q4_K_M", "  - {type: Q4_K_M, file: A.GGUF}"),
     "10: quants[1]: output file 'A.GGUF' collides with Q8_0's 'a.gguf'; give each quant its own file name"),
    ("two quants in one repo", lambda t: t + "  layout: per-quant\n  repo_template: '{namespace}/x-{quant:.1}'\n",
     "14: hub.repo_template: gives 'moeq-test/x-Q' for both Q8_0 and Q4_K_M; each quant needs its own repo"),
    ("bad shard size", lambda t: t + "  max_shard_size: lots\n",
     "13: hub.max_shard_size: 'lots' is not a size; write e.g. 50GB, 45G or 500MB"),
    ("missing imatrix file", lambda t: t.replace("  - type: Q8_0", "  - {type: Q8_0, imatrix: nope.dat}"),
     "9: quants[0].imatrix: "),
    ("synth width not multiple of 256", lambda t: t.replace("  kind: synth", "  kind: synth\n  synth: {embd: 300}"),
     "8: source.synth.embd: must be a multiple of 256 so K-quants apply, got 300"),
    ("bad yaml", lambda t: t.replace("  license: mit", "  license: [mit"),
     "5: not valid YAML"),
    ("empty ladder", lambda t: t.replace("  - type: Q8_0\n  - type: Q4_K_M\n", "  []\n"),
     "9: quants: the ladder is empty; list at least one quant, e.g. - type: Q8_0"),
]


@pytest.mark.parametrize("name,transform,expected", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_pipeline_files(tmp_path, name, transform, expected):
    path = write(tmp_path, transform(GOOD))
    message = error_of(path)
    assert message.startswith(f"{path}:{expected}"), message
    assert "\n" not in message


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert error_of(missing) == f"{missing}: pipeline file not found; pass --config with the path to your pipeline.yaml"
    empty = write(tmp_path, "")
    assert error_of(empty) == f"{empty}:1: the pipeline file is empty; start from examples/tiny-phimoe.yaml"


@pytest.mark.parametrize("text,expected", [
    ("50GB", 50_000_000_000), ("45G", 45_000_000_000), ("500MB", 500_000_000),
    ("1.5 GiB", int(1.5 * 2**30)), ("123", 123), ("lots", None), ("5 parsecs", None),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_the_quantize_silence_limit_is_a_setting_with_a_range(tmp_path):
    config = pipeline_file(tmp_path, trained=False, toolchain={"quantize_silence_s": 3600})
    assert load_pipeline(config).toolchain.quantize_silence_s == 3600
    for bad in (5, 10**6, "soon"):
        config = pipeline_file(tmp_path, trained=False, toolchain={"quantize_silence_s": bad})
        proc = run_moeq("check-config", "--config", str(config))
        assert proc.returncode == 2 and "toolchain.quantize_silence_s" in proc.stderr, proc.stderr

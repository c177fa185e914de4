"""The choice stage: a quant with an importance matrix is made with and without it, both measured against F16 on
the evaluation text, and the better one (beyond twice the combined uncertainty) is the published file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeq.kld import compare
from moeq.choice.stage import choose
from moeq.records import Candidate, FileRef, Made, PerplexityFigures

from conftest import example_section, pipeline_file, run_moeq

CPU_ONLY = {**{k: v for k, v in example_section("bench").items() if k != "rpc"}, "modes": ["cpu"], "repetitions": 1}


def figures(pair) -> PerplexityFigures:
    return PerplexityFigures(command=["llama-perplexity"], kld_mean=pair[0], kld_mean_err=pair[1])


def candidates(with_, without) -> list[Candidate]:
    file = FileRef(path="q.gguf", size=1, sha256="0" * 64)
    return [Candidate(name=Made.WITH, imatrix=None, file=file, quality=figures(with_)),
            Candidate(name=Made.WITHOUT, imatrix=None, file=file, quality=figures(without))]


@pytest.mark.parametrize("a,b,verdict", [
    ((0.060273, 0.001633), (0.051820, 0.001150), "higher"),  # Q2_K of the trained example, with against without
    ((0.004173, 0.000191), (0.004570, 0.000272), "unclear"),  # its Q4_K_M: lower, but within 2 sigma
    ((0.004173, 0.000050), (0.004570, 0.000050), "lower"),
    ((0.004173, None), (0.004570, None), "lower"),  # no uncertainty printed: the figures as they are
    ((None, None), (0.004570, 0.0001), None),
])
def test_two_figures_are_compared_against_twice_their_combined_uncertainty(a, b, verdict):
    assert compare(figures(a), figures(b)) == verdict


@pytest.mark.parametrize("with_,without,may_choose,chosen,why", [
    ((0.060273, 0.001633), (0.051820, 0.001150), True, 1,
     "the file made without the importance matrix has the lower mean KL divergence against F16 by more than twice "
     "the combined uncertainty (0.060273 ± 0.001633 with the importance matrix; 0.051820 ± 0.001150 without the "
     "importance matrix)"),
    ((0.004173, 0.000191), (0.004570, 0.000272), True, 0,
     "differs by no more than twice the combined uncertainty"),
    ((0.004573, 0.000191), (0.004170, 0.000272), True, 0,  # lower without, but within 2 sigma: the stock stays
     "so the stock choice, with the importance matrix, stays"),
    ((0.004173, 0.00005), (0.004570, 0.00005), True, 0,
     "the file made with the importance matrix has the lower mean KL divergence"),
    ((None, None), (0.004570, 0.0001), True, 0, "a mean KL divergence is missing"),
    ((0.060273, 0.001633), (0.051820, 0.001150), False, 0,
     "quants[].imatrix names the importance matrix, so the file made with the importance matrix is published, "
     "though its mean KL divergence against F16 is higher"),
])
def test_the_stock_choice_stays_unless_the_other_is_better_beyond_the_uncertainty(with_, without, may_choose,
                                                                                   chosen, why):
    index, reason = choose(candidates(with_, without), may_choose)
    assert index == chosen and why in reason


def choice_json(config: Path, quant: str) -> tuple[dict, dict]:
    proc = run_moeq("quantize", "--config", str(config), "--quant", quant, "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    return result["record"], result["choice"]


@pytest.fixture(scope="module")
def chosen(tmp_path_factory, toolchain):
    config = pipeline_file(tmp_path_factory.mktemp("choice"), bench=CPU_ONLY)
    quantized, choice = choice_json(config, "Q2_K")
    return config, quantized, choice


def test_the_published_file_is_the_candidate_the_measurements_favour(chosen):
    config, quantized, choice = chosen
    work = config.parent / "work"
    [with_, without] = choice["candidates"]
    assert (with_["name"], without["name"]) == (Made.WITH, Made.WITHOUT)
    assert with_["imatrix"]["sha256"] and without["imatrix"] is None
    verdict = compare(PerplexityFigures(**without["quality"]), PerplexityFigures(**with_["quality"]))
    assert choice["chosen"] == (1 if verdict == "lower" else 0) and choice["may_choose"] is True
    published = choice["candidates"][choice["chosen"]]
    # The quant is that candidate, byte for byte (moved into place), made as the record says.
    assert quantized["output"]["sha256"] == published["file"]["sha256"]
    assert quantized["options"]["imatrix"] == published["imatrix"]
    assert published["file"]["sha256"] != choice["candidates"][1 - choice["chosen"]]["file"]["sha256"]
    # Both candidates' files are gone once chosen; their records stay.
    assert not list((work / "choice").rglob("*.gguf"))
    assert {p.name for p in (work / "records").glob("quantize-Q2_K-*.json")} == {
        "quantize-Q2_K-with-imatrix.json", "quantize-Q2_K-without-imatrix.json"}
    # The trained example's Q2_K: without the importance matrix, as long as that measures better.
    if verdict == "lower":
        assert quantized["options"]["imatrix"] is None and "without the importance matrix has the lower" in choice["why"]


def test_a_second_run_measures_nothing_and_a_lost_candidate_is_made_again_for_a_forced_choice(chosen, tmp_path):
    config, quantized, choice = chosen
    work = config.parent / "work"
    logs = sorted((work / "choice" / "Q2_K").glob("perplexity-*.log"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    again, same = choice_json(config, "Q2_K")
    assert again == quantized and same == choice
    assert {p: p.stat().st_mtime_ns for p in logs} == before  # nothing measured again
    proc = run_moeq("build", "--config", str(config), "--quant", "Q2_K", "--force-stage", "choice", "--json")
    assert proc.returncode == 0, proc.stderr
    stages = {s["stage"]: s for s in json.loads(proc.stdout)["quants"][0]["stages"]}
    assert stages["choice"]["status"] == "ran" and stages["quantize"]["status"] == "ran"
    # llama-quantize is deterministic: the candidates made again are the same files, and so is the quant.
    record = json.loads((work / "records" / "choice-Q2_K.json").read_text())["record"]
    assert [c["file"]["sha256"] for c in record["candidates"]] == [c["file"]["sha256"] for c in choice["candidates"]]
    made = json.loads((work / "records" / "quantize-Q2_K.json").read_text())["record"]["output"]
    assert made["sha256"] == quantized["output"]["sha256"]
    assert not list((work / "choice").rglob("*.gguf"))


def test_the_card_says_which_file_was_published_and_why(chosen):
    config, _quantized, choice = chosen
    proc = run_moeq("build", "--config", str(config), "--quant", "Q2_K")
    assert proc.returncode == 0, proc.stderr
    repo = config.parent / "work" / "repos" / "ladder"
    card = (repo / "README.md").read_text()
    published, other = choice["candidates"][choice["chosen"]], choice["candidates"][1 - choice["chosen"]]
    assert f"this file is the one made {published['name']}." in card.replace("\n", " ")
    header = f"| Figure | This file ({published['name']}) | Q2_K {other['name']} |"
    assert header in card
    kld = f"| Mean KL divergence | {published['quality']['kld_mean']:.6f} ± {published['quality']['kld_mean_err']:.6f} " \
          f"| {other['quality']['kld_mean']:.6f} ± {other['quality']['kld_mean_err']:.6f} |"
    assert kld in card
    if choice["chosen"] == 1:
        assert "**On this model the importance matrix made Q2_K worse**, so this file is made without" in card
        assert "- **Importance matrix**: none (made with it, Q2_K measured worse against F16" in card
        assert not list(repo.glob("*.imatrix"))  # no quant of this repo was made with it
    assert run_moeq("card", "verify", str(repo / "README.md")).returncode == 0
    manifest = json.loads((repo / "moeq-manifest.json").read_text())
    [entry] = manifest["quants"]
    assert entry["records"]["choice"]["chosen"] == choice["chosen"]
    measured = entry["records"]["bench"]["quality"]["quant"]  # measured once, by the choice
    assert {k: v for k, v in measured.items() if k != "command"} == {
        k: v for k, v in published["quality"].items() if k != "command"}
    assert measured["command"][2] == "tiny-phimoe-Q2_K.gguf"  # published with file names, not local paths


def test_a_named_importance_matrix_is_the_pipelines_choice(chosen, tmp_path):
    """quants[].imatrix: PATH publishes the file made with that matrix; both are measured, and a worse one is
    said (a warning and the card)."""
    config, _quantized, choice = chosen
    matrix = config.parent / "work" / "imatrix" / "tiny-phimoe.imatrix"
    named = pipeline_file(tmp_path, bench=CPU_ONLY,
                          quants=[{"type": "Q2_K", "imatrix": str(matrix)}])
    proc = run_moeq("build", "--config", str(named), "--quant", "Q2_K", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "work" / "records" / "choice-Q2_K.json").read_text())["record"]
    assert record["may_choose"] is False and record["chosen"] == 0
    quantized = json.loads((tmp_path / "work" / "records" / "quantize-Q2_K.json").read_text())["record"]
    assert quantized["options"]["imatrix"]["sha256"] == record["candidates"][0]["imatrix"]["sha256"]
    card = (tmp_path / "work" / "repos" / "ladder" / "README.md").read_text()
    if choice["chosen"] == 1:  # the same figures: the importance matrix made it worse
        assert "warning: Q2_K: the importance matrix made it worse" in proc.stderr
        assert "The pipeline names the importance matrix file, so this\nfile is made with it all the same." in card


@pytest.mark.slow
def test_skip_bench_makes_the_stock_file_without_measuring(tmp_path, toolchain):
    config = pipeline_file(tmp_path, bench=CPU_ONLY)
    proc = run_moeq("build", "--config", str(config), "--quant", "Q2_K", "--skip-bench", "--json")
    assert proc.returncode == 0, proc.stderr
    stages = {s["stage"]: s for s in json.loads(proc.stdout)["quants"][0]["stages"]}
    assert stages["choice"]["status"] == "skipped"
    assert stages["choice"]["detail"] == "--skip-bench; the file is made with the importance matrix"
    quantized = json.loads((tmp_path / "work" / "records" / "quantize-Q2_K.json").read_text())["record"]
    assert quantized["options"]["imatrix"] is not None
    assert not (tmp_path / "work" / "choice").exists()

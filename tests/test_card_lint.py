"""Card lint: each rule on the tiny model's real card, the seed card's known defects, derived figures."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from moeq.cards.facts import card_facts
from moeq.cards.lint import lint_card
from moeq.cards.render import render_card

from conftest import REPO, run_moeq

SEED = REPO / "tests" / "data" / "seed-model-card.md"  # a hand-written card of this kind, as published


def rules(text: str, manifest: dict | None) -> list[tuple[int, str]]:
    return [(f.line, f.rule) for f in lint_card(text, "README.md", manifest)]


def insert_after_heading(text: str, addition: str, heading: str = "## Model details") -> tuple[str, int]:
    """The card with `addition` as a paragraph before `heading`, and the line it landed on."""
    before, after = text.split(heading, 1)
    line = before.count("\n") + 1
    return f"{before}{addition}\n\n{heading}{after}", line


BAD_ADDITIONS = [
    ("conflict-marker", "<<<<<<< HEAD"),
    ("trailing-whitespace", "A line with a hard break  "),
    ("relative-link", "Smaller: [Q2_K](../phi-3.5-moe-q2-k-cpu-offload-gguf)."),
    ("insecure-link", "See [the paper](http://arxiv.org/abs/2404.14219)."),
    ("hub-link", "Also try [this](https://huggingface.co/someone/else-gguf)."),
]
GOOD_ADDITIONS = [
    ("conflict-marker", "Heading\n======="),  # a setext heading underline, not a merge conflict
    ("trailing-whitespace", "A line without trailing spaces"),
    ("relative-link", "Jump to [usage](#usage)."),
    ("insecure-link", "See [the paper](https://arxiv.org/abs/2404.14219)."),
    ("hub-link", "Smaller: [Q2_K](https://huggingface.co/moeq-test/tiny-phimoe-GGUF/blob/main/tiny-phimoe-Q2_K.gguf) "
                 "and the [base model](https://huggingface.co/microsoft/Phi-3.5-MoE-instruct/tree/main)."),
]


@pytest.mark.parametrize("rule,addition", BAD_ADDITIONS, ids=[r for r, _ in BAD_ADDITIONS])
def test_rule_fails(good_card, rule, addition):
    text, manifest = good_card
    changed, line = insert_after_heading(text, addition)
    assert rules(changed, manifest) == [(line, rule)]


@pytest.mark.parametrize("rule,addition", GOOD_ADDITIONS, ids=[r for r, _ in GOOD_ADDITIONS])
def test_rule_passes(good_card, rule, addition):
    text, manifest = good_card
    changed, _ = insert_after_heading(text, addition)
    assert rules(changed, manifest) == []


def test_links_inside_code_are_not_links(good_card):
    text, manifest = good_card
    changed, _ = insert_after_heading(text, "```sh\ncurl http://localhost:8080/v1 ../x\n```\nand `http://x/y`")
    assert rules(changed, manifest) == []


@pytest.mark.parametrize("change,message", [
    (lambda t: t.replace("base_model_relation: quantized\n", ""), "'base_model_relation' is missing"),
    (lambda t: t.replace("base_model_relation: quantized", "base_model_relation: finetune"), "'quantized'"),
    (lambda t: t.replace("license: mit", "license: [mit"), "does not parse"),
    (lambda t: t.split("---\n", 2)[2], "no YAML frontmatter"),
])
def test_frontmatter_rule(good_card, change, message):
    text, manifest = good_card
    findings = lint_card(change(text), "README.md", manifest)
    assert [f.rule for f in findings] == ["frontmatter"] and message in findings[0].message
    assert findings[0].line == 1


def test_unrecorded_figure(good_card):
    text, manifest = good_card
    row = next(line for line in text.splitlines() if line.startswith("| [tiny-phimoe-Q8_0.gguf]"))
    size = re.search(r"\| (\d+\.\d+) MB \|", row).group(1)
    typed = row.replace(f"{size} MB", "4.20 MB")
    line = text.splitlines().index(row) + 1
    assert rules(text.replace(row, typed), manifest) == [(line, "unrecorded-figure")]
    # The same edit passes when nothing says what the records hold: that is what --records is for.
    assert rules(text.replace(row, typed), None) == []


@pytest.mark.parametrize("edit", ["bullet", "prose"])
def test_unrecorded_figure_outside_tables(good_card, edit):
    """A hand-typed figure in a list item or a sentence is caught like one in a table."""
    text, manifest = good_card
    if edit == "bullet":
        bullet = next(line for line in text.splitlines() if line.startswith("- **Source**: "))
        size = re.search(r"(\d+\.\d+) MB", bullet).group(1)
        changed, line = text.replace(bullet, bullet.replace(size, "9.36", 1)), text.splitlines().index(bullet) + 1
    else:
        changed, line = insert_after_heading(text, "In our tests it ran at 123.45 tokens/s on a laptop.")
    findings = lint_card(changed, "README.md", manifest)
    assert [(f.line, f.rule) for f in findings] == [(line, "unrecorded-figure")]
    assert findings[0].message.startswith("9.36 is in no record" if edit == "bullet" else "123.45 is in no record")


@pytest.mark.parametrize("layout", ["single", "per-quant"])
def test_a_sharded_card_lints_clean_whatever_the_shard_count(good_card, layout):
    """The count of shards is a fact (from the manifest's file list), not a figure a template computes. In the one
    repo a split quant's shards have a folder of their own."""
    _, manifest = good_card
    manifest = manifest.model_copy(deep=True, update={"layout": layout})
    folder = "tiny-phimoe-Q8_0/" if layout == "single" else ""
    names = [f"{folder}tiny-phimoe-Q8_0-{i:05d}-of-00017.gguf" for i in range(1, 18)]
    entry = manifest.quants[0]
    entry.files = [entry.files[0].model_copy(update={"name": name, "size": 250_000}) for name in names]
    manifest.repo_files = sorted({*manifest.repo_files, *names} - {"tiny-phimoe-Q8_0.gguf"})
    text = render_card(card_facts(manifest))
    assert f"`{names[0]}` (the first of 17 shards)" in text
    pattern = "tiny-phimoe-Q8_0/*" if layout == "single" else "tiny-phimoe-Q8_0-*-of-00017.gguf"
    assert f'hf download moeq-test/tiny-phimoe-GGUF --include "{pattern}" --local-dir models' in text
    assert "ollama run hf.co/moeq-test/tiny-phimoe-GGUF:Q8_0" not in text  # Ollama does not load split files
    assert lint_card(text, "README.md", manifest) == []


def test_unknown_file(good_card):
    text, manifest = good_card
    row = next(line for line in text.splitlines() if line.startswith("| [tiny-phimoe-Q8_0.gguf]"))
    line = text.splitlines().index(row) + 1
    extra = row.replace("tiny-phimoe-Q8_0.gguf", "tiny-phimoe-Q8_0-00002-of-00002.gguf")
    findings = lint_card(text.replace(row, row + "\n" + extra), "README.md", manifest)
    # Twice: the file table names it, and its resolve/main link points at a file the repo will not hold.
    assert [(f.line, f.rule) for f in findings] == [(line + 1, "unknown-file")] * 2
    assert sorted(f.message for f in findings) == [
        "links tiny-phimoe-Q8_0-00002-of-00002.gguf (an image or file) in this repo, which it will not hold",
        "the file table names tiny-phimoe-Q8_0-00002-of-00002.gguf, which this repo will not contain"]


def test_seed_card_fails_with_its_known_defects():
    text = SEED.read_text()
    lines = text.split("\n")
    findings = lint_card(text, "seed.md", None)
    by_rule: dict[str, list[int]] = {}
    for f in findings:
        by_rule.setdefault(f.rule, []).append(f.line)
    markers = [i for i, line in enumerate(lines, 1) if re.match(r"(<{7}|={7}$|>{7})", line)]
    assert by_rule["conflict-marker"] == markers and len(markers) == 24
    relative = [i for i, line in enumerate(lines, 1) if "](../" in line]
    assert by_rule["relative-link"] == relative == [155, 156, 213, 214]
    assert by_rule["frontmatter"] == [1]  # no base_model_relation
    assert set(by_rule) == {"conflict-marker", "relative-link", "trailing-whitespace", "frontmatter"}


def test_cli_lint_on_the_seed_card(tmp_path):
    seed = tmp_path / "README.md"
    shutil.copy(SEED, seed)
    proc = run_moeq("card", "lint", str(seed))
    assert proc.returncode == 7
    out = proc.stdout.splitlines()
    assert f"{seed}:83: conflict-marker: git merge-conflict marker '<<<<<<< HEAD'; resolve the merge" in out
    assert any(line.startswith(f"{seed}:155: relative-link: ") for line in out)
    assert "hub-link, unrecorded-figure and unknown-file were not checked" in proc.stderr
    proc = run_moeq("card", "lint", str(seed), "--records", str(tmp_path))
    assert proc.returncode == 3 and "no records manifest" in proc.stderr


def test_cli_lint_clean_card_uses_its_manifest(carded_ladder, carded_per_quant):
    for ws, key in ((carded_ladder[1], None), (carded_per_quant[1], "Q2_K")):
        proc = run_moeq("card", "lint", str(ws.repo_dir(key) / "README.md"), "--json")
        assert proc.returncode == 0, proc.stdout
        assert json.loads(proc.stdout) == {"file": str(ws.repo_dir(key) / "README.md"), "records": True,
                                           "findings": []}


@pytest.mark.parametrize("before,after,message", [
    ("Tensor types in the file (39 tensors):", "Tensor types in the file (40 tensors):",
     "40 tensors, but the table's rows add up to 39"),
    ("- **Parameters**: 3.8M (3,807,808)", "- **Parameters**: 3.9M (3,807,808)", "3.9M parameters is not 3,807,808"),
])
def test_a_derived_figure_that_its_parts_do_not_give_is_found(before, after, message):
    text = (Path(__file__).parent / "golden" / "tiny-phimoe-Q8_0.md").read_text()
    assert before in text and lint_card(text, "README.md") == []
    [finding] = lint_card(text.replace(before, after), "README.md")
    assert finding.rule == "derived-figure" and finding.message.startswith(message)


def test_derived_products_are_checked():
    from moeq.cards.derived import derived_findings

    good = ["- **Evaluated**: 12 chunks of 256 tokens (3,072 tokens)",
            "- **Expert coverage**: while it ran, the router sent each of the 8 experts (4 in each of 2 layers) between"]
    assert derived_findings(good) == []
    bad = [good[0].replace("3,072", "3,000"), good[1].replace("(4 in each", "(3 in each")]
    assert [f.message for f in derived_findings(bad)] == ["3,000 tokens evaluated is not 12 x 256 = 3,072",
                                                           "8 experts is not 3 x 2 = 6"]

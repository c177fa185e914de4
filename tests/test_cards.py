"""Model cards on the tiny model's real quants: golden files, lint rules, missing records, preview.

Golden cards are regenerated with
    MOEQ_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_cards.py -k golden
and reviewed by eye before committing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from moeq.cards.facts import card_facts
from moeq.cards.lint import lint_card
from moeq.cards.render import render_card
from moeq.manifest import MANIFEST_NAME, read_manifest
from moeq import steps
from moeq.steps import Context
from moeq.config import load_pipeline
from moeq.errors import CheckFailed, InputError
from moeq.cards.stage import staged_paths
from moeq.workspace import Workspace

from conftest import REPO, run_moeq

GOLDEN = REPO / "tests" / "golden"
SEED = REPO / "tests" / "data" / "seed-model-card.md"  # a hand-written card of this kind, as published
LADDER = ("Q8_0", "Q4_K_M", "Q2_K")
CHARTS = ("images/gpu-memory.png",)  # no bench here, so no quality chart: empty axes are not published


PER_QUANT = '  layout: per-quant\n  repo_template: "{namespace}/tiny-phimoe-{quant_slug}-gguf"\n'


def copy_example(folder: Path, card: str = "", layout: str = "single") -> Path:
    """examples/tiny-phimoe.yaml in `folder` (so its workspace is there), optionally with another card: section,
    or with a repo per quant (`layout="per-quant"`).

    With random weights (numpy, seeded: the same bytes on every machine), where the trained model's weights
    depend on the CPU torch ran on; cards are about what the records say, not what the model learned."""
    text = re.sub(r"  train: true.*\n", "", (REPO / "examples" / "tiny-phimoe.yaml").read_text())
    if card:
        text = re.sub(r"\ncard:\n(?:  .*\n|\n)*", "\n" + card, text)
    if layout == "per-quant":
        text = text.replace("  max_shard_size: 50GB\n", "  max_shard_size: 50GB\n" + PER_QUANT)
    path = folder / "tiny-phimoe.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build_until_card(config: Path, validate: tuple[str, ...] = LADDER) -> tuple:
    pipeline = load_pipeline(config)
    ws = Workspace(pipeline.workspace)
    for q in LADDER:
        steps.quantize(Context.of(pipeline), pipeline.quant(q))
    for q in validate:
        steps.validate(Context.of(pipeline), pipeline.quant(q), numerics="sample")
    return pipeline, ws


def make_cards(pipeline, quants: tuple[str, ...] = LADDER, ctx: Context | None = None) -> dict:
    """The cards of the repos `quants` go to, as `moeq card --quant ...` makes them: key (quant, or None for the
    ladder's one repo) -> outcome."""
    ctx = ctx or Context.of(pipeline)
    return {u.quant: steps.card(ctx, u) for u in steps.repo_units(ctx, [pipeline.quant(q) for q in quants])}


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, toolchain):
    """The example pipeline (one repo for the ladder) quantized, validated and carded in a workspace of its own."""
    config = copy_example(tmp_path_factory.mktemp("cards"))
    pipeline, ws = build_until_card(config)
    return pipeline, ws, make_cards(pipeline)


@pytest.fixture(scope="module")
def per_quant(tmp_path_factory, toolchain):
    """The same with a repo per quant (hub.layout per-quant)."""
    config = copy_example(tmp_path_factory.mktemp("cards-per-quant"), layout="per-quant")
    pipeline, ws = build_until_card(config)
    return pipeline, ws, make_cards(pipeline)


def card_text(ws: Workspace, quant: str | None = None) -> str:
    return (ws.repo_dir(quant) / "README.md").read_text()


@pytest.mark.parametrize("layout,quant", [("single", None), *(("per-quant", q) for q in LADDER)])
def test_golden(ladder, per_quant, layout, quant):
    _, ws, _ = ladder if layout == "single" else per_quant
    text = card_text(ws, quant)
    golden = GOLDEN / f"tiny-phimoe-{quant or 'GGUF'}.md"
    if os.environ.get("MOEQ_REGEN_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(text)
    # The imatrix comes from llama.cpp's forward pass, whose float sums may differ in their last bits on another
    # CPU: the hashes of the imatrix and of the files made with it are compared by card verify, not here.
    assert same_but_hashes(text, golden.read_text()), f"card differs from {golden}; see the module docstring to regenerate"


def same_but_hashes(text: str, golden: str) -> bool:
    hashes = re.compile(r"\b[0-9a-f]{64}\b")
    return hashes.sub("<sha256>", text) == hashes.sub("<sha256>", golden)


def hub_links(text: str) -> set[str]:
    return set(re.findall(r"\(https://huggingface\.co/([\w.-]+/[\w.-]+)", text))


def test_per_quant_cards_link_the_repos_published_together_and_pass_lint(per_quant):
    pipeline, ws, _ = per_quant
    repos = {q: pipeline.repo_id(pipeline.quant(q)) for q in LADDER}
    for quant in LADDER:
        text = card_text(ws, quant)
        manifest = read_manifest(ws.repo_dir(quant) / MANIFEST_NAME)
        assert lint_card(text, "README.md", manifest) == []
        assert hub_links(text) == {*repos.values(), "microsoft/Phi-3.5-MoE-instruct"}
        assert "](../" not in text and "not built" not in text


def test_a_per_quant_card_made_alone_links_no_unpublished_sibling(per_quant, tmp_path):
    """`moeq card --quant Q8_0` (what `build --quant Q8_0 --push` makes) with no sibling pushed: no sibling links."""
    pipeline, ws, _ = per_quant
    outcome = make_cards(pipeline, ("Q8_0",))["Q8_0"]
    text = card_text(ws, "Q8_0")
    assert hub_links(text) == {pipeline.repo_id(pipeline.quant("Q8_0")), "microsoft/Phi-3.5-MoE-instruct"}
    assert "## Other quants of this model" not in text and not outcome.up_to_date
    make_cards(pipeline)  # back to the fixture's cards


def test_the_one_repos_card_lists_the_ladder_and_links_only_itself(ladder):
    pipeline, ws, outcomes = ladder
    text = card_text(ws)
    manifest = read_manifest(ws.repo_dir(None) / MANIFEST_NAME)
    assert lint_card(text, "README.md", manifest) == []
    assert hub_links(text) == {"moeq-test/tiny-phimoe-GGUF", "microsoft/Phi-3.5-MoE-instruct"}
    assert [q.quant for q in manifest.quants] == list(LADDER) and outcomes[None].record.quants == list(LADDER)
    for quant in LADDER:
        assert f"\n## {quant}\n" in text
        assert f"llama-server -hf moeq-test/tiny-phimoe-GGUF:{quant} -ngl 99 --cpu-moe" in text
        assert f"ollama run hf.co/moeq-test/tiny-phimoe-GGUF:{quant}\n" in text
        assert f"hf download moeq-test/tiny-phimoe-GGUF tiny-phimoe-{quant}.gguf --local-dir models" in text


def test_which_file_should_i_choose(ladder):
    """Computed from the plans: on the tiny model every quant fits every GPU size, so one row group holds them."""
    _, ws, _ = ladder
    text = card_text(ws)
    table = text.split("## Which file should I choose?")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[1] for r in rows] == list(LADDER)
    assert rows[0].startswith("| 8 GiB or more | Q8_0 | ") and rows[1].startswith("|  | Q4_K_M | ")
    assert all("| all on the GPU | 1.00 GiB | " in r and r.endswith("| not measured | not measured |") for r in rows)


def test_one_repo_made_for_some_quants_lists_only_those(ladder):
    """A quant not asked for (and never pushed from here) is not in the one repo's card or its staged folder."""
    pipeline, ws, _ = ladder
    outcome = make_cards(pipeline, ("Q4_K_M",))[None]
    assert outcome.record.quants == ["Q4_K_M"]
    assert staged_paths(ws.repo_dir(None)) == sorted(["README.md", MANIFEST_NAME, "tiny-phimoe-Q4_K_M.gguf",
                                                      "tiny-phimoe.imatrix", *CHARTS])
    assert "tiny-phimoe-Q8_0" not in card_text(ws)
    make_cards(pipeline)


def test_staged_folder_holds_exactly_the_repo(ladder, per_quant):
    pipeline, ws, _ = per_quant
    for quant in LADDER:
        folder = ws.repo_dir(quant)
        gguf_name = pipeline.quant(quant).file
        imatrix = ["tiny-phimoe.imatrix"] if quant != "Q8_0" else []  # the matrix Q4_K_M and Q2_K were made with
        assert staged_paths(folder) == sorted(["README.md", MANIFEST_NAME, gguf_name, *imatrix, *CHARTS])
        assert os.path.samefile(folder / gguf_name, ws.quant_path(gguf_name))
        if imatrix:
            assert os.path.samefile(folder / imatrix[0], ws.root / "imatrix" / imatrix[0])
        manifest = read_manifest(folder / MANIFEST_NAME)
        assert manifest.quants[0].files[0].sha256 == json.loads(
            ws.record_path("quantize", quant).read_text())["record"]["output"]["sha256"]
    pipeline, ws, _ = ladder
    folder = ws.repo_dir(None)
    names = [pipeline.quant(q).file for q in LADDER]
    assert staged_paths(folder) == sorted(["README.md", MANIFEST_NAME, "tiny-phimoe.imatrix", *names, *CHARTS])
    for name in names:
        assert os.path.samefile(folder / name, ws.quant_path(name))
    for name in ("README.md", MANIFEST_NAME):  # a maintainer's folders stay local: no absolute path is published
        published = (folder / name).read_text()
        assert str(ws.root) not in published and str(Path.home()) not in published


def test_frontmatter_round_trips_through_huggingface_hub(ladder, per_quant):
    for (_, ws, _), keys in ((ladder, [None]), (per_quant, LADDER)):
        for key in keys:
            facts = card_facts(read_manifest(ws.repo_dir(key) / MANIFEST_NAME))
            data = ModelCard(card_text(ws, key)).data.to_dict()
            assert data == facts["frontmatter"]
            assert data["base_model_relation"] == "quantized"
            assert all(q in data["tags"] for q in ([key] if key else LADDER))


def test_second_card_run_is_up_to_date(ladder):
    pipeline, ws, _ = ladder
    before = (ws.repo_dir(None) / "README.md").stat().st_mtime_ns
    assert make_cards(pipeline)[None].up_to_date
    assert (ws.repo_dir(None) / "README.md").stat().st_mtime_ns == before


def test_cli_card_and_json(ladder):
    pipeline, _, _ = ladder
    proc = run_moeq("card", "--config", str(pipeline.path), "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    assert result["skipped"] is True
    assert result["record"]["repo_id"] == "moeq-test/tiny-phimoe-GGUF" and result["record"]["quant"] is None
    assert result["record"]["not_measured"] == [f"{q}: {what} (bench)" for q in LADDER
                                                for what in ("speed", "measured VRAM", "quality")]


# ---------------------------------------------------------------- missing records and facts


def test_missing_validate_record_says_not_measured(tmp_path, toolchain):
    config = copy_example(tmp_path)
    pipeline, ws = build_until_card(config, validate=("Q8_0",))
    outcome = make_cards(pipeline)[None]
    text = card_text(ws)
    memory = text.split("\n## Q2_K\n")[1].split("### Memory: where the weights go")[1].split("\n### ")[0]
    assert memory.strip() == ("Not measured: this file has no validation record, so no memory plan was "
                              "computed for it.")
    assert "GiB" not in memory and "KiB" not in memory
    assert "Q2_K: memory plan (validate)" in outcome.record.not_measured
    assert "Q8_0: memory plan (validate)" not in outcome.record.not_measured
    # The choice table's row of the unvalidated quant says so; the validated one's figures are there.
    table = text.split("## Which file should I choose?")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert "| Q2_K | " in rows[-1] and "| not computed (no validation record) |" in rows[-1]
    assert "| Q8_0 | " in rows[2] and "| all on the GPU | 1.00 GiB |" in rows[2]
    assert lint_card(text, "README.md", read_manifest(ws.repo_dir(None) / MANIFEST_NAME)) == []


def test_stale_validate_record_is_ignored_with_a_warning(tmp_path, toolchain):
    config = copy_example(tmp_path)
    pipeline, ws = build_until_card(config, validate=("Q8_0",))
    record_path = ws.record_path("validate", "Q8_0")
    data = json.loads(record_path.read_text())
    data["record"]["file"]["sha256"] = "0" * 64
    record_path.write_text(json.dumps(data))
    ctx = Context.of(pipeline)
    outcome = make_cards(pipeline, ("Q8_0",), ctx)[None]
    assert any("describes an older Q8_0 file" in w for w in ctx.warnings)
    assert "memory plan (validate)" in outcome.record.not_measured


def test_missing_quantize_record_is_a_clear_error(tmp_path):
    config = copy_example(tmp_path)
    proc = run_moeq("card", "--config", str(config), "--quant", "Q8_0")
    assert proc.returncode == 3
    assert proc.stderr.splitlines()[-1].startswith("error: ") and "no quantize record for Q8_0; run moeq quantize" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work" / "repos").exists()


def test_template_asking_for_a_missing_fact_names_it(tmp_path, toolchain):
    template = tmp_path / "card.md.j2"
    template.write_text("---\nlicense: mit\n---\n# {{ model.name }}\n\nSize: {{ quant.weight_in_tons }}\n")
    config = copy_example(tmp_path, card=f"card:\n  template: {template}\n")
    pipeline, ws = build_until_card(config, validate=())
    with pytest.raises(InputError) as err:
        make_cards(pipeline, ("Q8_0",))
    assert f"{template}:6:" in err.value.message and "weight_in_tons" in err.value.message
    assert not ws.repo_dir(None).exists()


def test_card_that_fails_lint_is_not_written(tmp_path, toolchain):
    bad = tmp_path / "bad.md.j2"
    good = (REPO / "templates" / "model-card.md.j2").read_text()
    bad.write_text(good.replace("## Model details", "See [the other quant](../sibling-gguf).\n\n## Model details"))
    config = copy_example(tmp_path, card=f"card:\n  template: {bad}\n")
    pipeline, ws = build_until_card(config, validate=())
    with pytest.raises(CheckFailed) as err:
        make_cards(pipeline, ("Q8_0",))
    assert "relative-link" in err.value.message and "was not" in err.value.message
    assert not (ws.repo_dir(None) / "README.md").exists()
    proc = run_moeq("card", "--config", str(config), "--quant", "Q8_0")
    assert proc.returncode == 7 and "relative-link" in proc.stderr


def test_user_template_can_include_builtin_partials(tmp_path, toolchain):
    template = tmp_path / "mine.md.j2"
    template.write_text("---\n{{ frontmatter | card_yaml }}\n---\n\n# {{ model.name }} {{ quant.type }}\n\n"
                        "{% include 'partials/cpu-moe.md.j2' %}\n")
    config = copy_example(tmp_path, card=f"card:\n  template: {template}\n")
    pipeline, ws = build_until_card(config, validate=())
    make_cards(pipeline, ("Q8_0",))
    text = card_text(ws)
    assert text.splitlines()[-1].startswith("layers to fit the GPU")
    assert "# tiny-phimoe Q8_0" in text


# ---------------------------------------------------------------- lint rules


@pytest.fixture(scope="module")
def good(ladder):
    _, ws, _ = ladder
    return card_text(ws), read_manifest(ws.repo_dir(None) / MANIFEST_NAME)


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
def test_rule_fails(good, rule, addition):
    text, manifest = good
    changed, line = insert_after_heading(text, addition)
    assert rules(changed, manifest) == [(line, rule)]


@pytest.mark.parametrize("rule,addition", GOOD_ADDITIONS, ids=[r for r, _ in GOOD_ADDITIONS])
def test_rule_passes(good, rule, addition):
    text, manifest = good
    changed, _ = insert_after_heading(text, addition)
    assert rules(changed, manifest) == []


def test_links_inside_code_are_not_links(good):
    text, manifest = good
    changed, _ = insert_after_heading(text, "```sh\ncurl http://localhost:8080/v1 ../x\n```\nand `http://x/y`")
    assert rules(changed, manifest) == []


@pytest.mark.parametrize("change,message", [
    (lambda t: t.replace("base_model_relation: quantized\n", ""), "'base_model_relation' is missing"),
    (lambda t: t.replace("base_model_relation: quantized", "base_model_relation: finetune"), "'quantized'"),
    (lambda t: t.replace("license: mit", "license: [mit"), "does not parse"),
    (lambda t: t.split("---\n", 2)[2], "no YAML frontmatter"),
])
def test_frontmatter_rule(good, change, message):
    text, manifest = good
    findings = lint_card(change(text), "README.md", manifest)
    assert [f.rule for f in findings] == ["frontmatter"] and message in findings[0].message
    assert findings[0].line == 1


def test_unrecorded_figure(good):
    text, manifest = good
    row = next(line for line in text.splitlines() if line.startswith("| [tiny-phimoe-Q8_0.gguf]"))
    size = re.search(r"\| (\d+\.\d+) MB \|", row).group(1)
    typed = row.replace(f"{size} MB", "4.20 MB")
    line = text.splitlines().index(row) + 1
    assert rules(text.replace(row, typed), manifest) == [(line, "unrecorded-figure")]
    # The same edit passes when nothing says what the records hold: that is what --records is for.
    assert rules(text.replace(row, typed), None) == []


@pytest.mark.parametrize("edit", ["bullet", "prose"])
def test_unrecorded_figure_outside_tables(good, edit):
    """A hand-typed figure in a list item or a sentence is caught like one in a table."""
    text, manifest = good
    if edit == "bullet":
        bullet = next(line for line in text.splitlines() if line.startswith("- **Source**: "))
        size = re.search(r"(\d+\.\d+) MB", bullet).group(1)
        changed, line = text.replace(bullet, bullet.replace(size, "9.36", 1)), text.splitlines().index(bullet) + 1
    else:
        changed, line = insert_after_heading(text, "In our tests it ran at 123.45 tokens/s on a laptop.")
    findings = lint_card(changed, "README.md", manifest)
    assert [(f.line, f.rule) for f in findings] == [(line, "unrecorded-figure")]
    assert findings[0].message.startswith("9.36 is in no record" if edit == "bullet" else "123.45 is in no record")


def _staged_copy(ws, quant: str | None, folder: Path, edit=lambda t: t) -> Path:
    """The staged README (edited) with its manifest beside it, in `folder`."""
    folder.mkdir()
    shutil.copy(ws.repo_dir(quant) / MANIFEST_NAME, folder / MANIFEST_NAME)
    card = folder / "README.md"
    card.write_text(edit(card_text(ws, quant)))
    return card


def test_card_verify_finds_every_edited_line(ladder, tmp_path):
    _, ws, _ = ladder
    proc = run_moeq("card", "verify", str(ws.repo_dir(None) / "README.md"))
    assert proc.returncode == 0 and "no findings" in proc.stdout, proc.stdout + proc.stderr
    text = card_text(ws)
    lines = text.splitlines()
    bullet = next(line for line in lines if line.startswith("- **Source**: "))
    this_row = next(line for line in lines if line.startswith("| [tiny-phimoe-Q4_K_M.gguf]"))
    q2k_row = next(line for line in lines if line.startswith("| [tiny-phimoe-Q2_K.gguf]"))
    q2k_size = re.search(r"\| ([\d.]+ MB) \|", q2k_row).group(1)
    own_size = re.search(r"\| ([\d.]+ MB) \|", this_row).group(1)
    # Another quant's size in this quant's row: a figure the records hold, so lint passes; verify does not.
    swapped_row = this_row.replace(own_size, q2k_size)
    edited_bullet = bullet.replace(bullet.split()[2], "9.36", 1)
    card = _staged_copy(ws, None, tmp_path / "edited",
                        lambda t: t.replace(this_row, swapped_row).replace(bullet, edited_bullet))
    assert run_moeq("card", "lint", str(card)).stdout.count("unrecorded-figure") == 1  # only the bullet
    proc = run_moeq("card", "verify", str(card))
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f'{card}:{lines.index(bullet) + 1}: edited: expected {json.dumps(bullet)}, found {json.dumps(edited_bullet)}',
        f'{card}:{lines.index(this_row) + 1}: edited: expected {json.dumps(this_row[:100] + "...")}, '
        f'found {json.dumps(swapped_row[:100] + "...")}',
    ]
    assert proc.stderr.strip() == f"error: {card}: 2 finding(s)"
    # A removed and an added line are named too.
    card = _staged_copy(ws, None, tmp_path / "moved", lambda t: t.replace(bullet + "\n", "") + "Hand-added.\n")
    proc = run_moeq("card", "verify", str(card), "--json")
    findings = json.loads(proc.stdout)["findings"]
    assert [(f["line"], f["rule"]) for f in findings] == [(lines.index(bullet) + 1, "removed"), (len(lines), "added")]


def test_card_verify_without_a_manifest_or_with_a_custom_template(ladder, tmp_path):
    _, ws, _ = ladder
    lone = tmp_path / "README.md"
    lone.write_text(card_text(ws))
    proc = run_moeq("card", "verify", str(lone))
    assert proc.returncode == 3 and proc.stderr.startswith(f"error: {tmp_path / MANIFEST_NAME}: no records manifest")
    card = _staged_copy(ws, None, tmp_path / "custom")
    manifest = json.loads((card.parent / MANIFEST_NAME).read_text())
    manifest["card"] = {**manifest["card"], "builtin": False, "template": "ours.md.j2"}
    (card.parent / MANIFEST_NAME).write_text(json.dumps(manifest))
    proc = run_moeq("card", "verify", str(card))
    assert proc.returncode == 3 and "rendered with the pipeline's own template 'ours.md.j2'" in proc.stderr
    proc = run_moeq("card", "verify", str(card), "--template", str(REPO / "templates" / "model-card.md.j2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("layout", ["single", "per-quant"])
def test_a_sharded_card_lints_clean_whatever_the_shard_count(good, layout):
    """The count of shards is a fact (from the manifest's file list), not a figure a template computes. In the one
    repo a split quant's shards have a folder of their own."""
    _, manifest = good
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


def test_unknown_file(good):
    text, manifest = good
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


def test_cli_lint_clean_card_uses_its_manifest(ladder, per_quant):
    for ws, key in ((ladder[1], None), (per_quant[1], "Q2_K")):
        proc = run_moeq("card", "lint", str(ws.repo_dir(key) / "README.md"), "--json")
        assert proc.returncode == 0, proc.stdout
        assert json.loads(proc.stdout) == {"file": str(ws.repo_dir(key) / "README.md"), "records": True,
                                           "findings": []}


# ---------------------------------------------------------------- preview


def test_preview_writes_html_outside_the_staged_repo(ladder, per_quant):
    pipeline, ws, _ = ladder
    proc = run_moeq("card", "preview", "--config", str(pipeline.path))
    assert proc.returncode == 0, proc.stderr
    html = (ws.root / "previews" / "ladder.html").read_text()
    assert "<table>" in html and "<h1>tiny-phimoe GGUF" in html
    assert '<a href="https://huggingface.co/moeq-test/tiny-phimoe-GGUF/resolve/main/tiny-phimoe-Q2_K.gguf">' in html
    assert '<span class="tag">gguf</span>' in html
    inside = ws.repo_dir(None) / "preview.html"
    proc = run_moeq("card", "preview", str(ws.repo_dir(None) / "README.md"), "--out", str(inside))
    assert proc.returncode == 7 and not inside.exists()
    pipeline, ws, _ = per_quant
    proc = run_moeq("card", "preview", "--config", str(pipeline.path), "--quant", "Q4_K_M")
    assert proc.returncode == 0, proc.stderr
    html = (ws.root / "previews" / "Q4_K_M.html").read_text()
    assert "<h1>tiny-phimoe Q4_K_M GGUF" in html
    assert '<a href="https://huggingface.co/moeq-test/tiny-phimoe-q8-0-gguf">' in html


def test_memory_section_on_the_real_models_layout(good):
    """The fit table and the -ncmoe example, on Phi-3.5-MoE's real tensor layout in Q8_0 (header only)."""
    import gguf

    from moeq.cards.render import render_card
    from moeq.config import SynthSpec
    from moeq.gguf_header import GGUFHeader, TensorInfo
    from moeq.synth import tensor_layout
    from moeq.memory_plan import plan_memory

    Q8_0 = gguf.GGMLQuantizationType.Q8_0
    real = SynthSpec(layers=32, experts=16, experts_used=2, embd=4096, ff=6400, heads=32, kv_heads=8, vocab=32064)
    tensors = [TensorInfo(name, list(shape), dtype if len(shape) == 1 or "gate_inp" in name else Q8_0, 0)
               for name, shape, dtype in tensor_layout(real)]
    metadata = {"general.architecture": "phimoe", "phimoe.block_count": 32, "phimoe.embedding_length": 4096,
                "phimoe.attention.head_count": 32, "phimoe.attention.head_count_kv": 8}
    plan = plan_memory(GGUFHeader(Path("real.gguf"), 3, metadata, tensors), ctx_sizes=[4096, 32768])
    _, manifest = good
    manifest = manifest.model_copy(deep=True)
    manifest.quants[0].records.validate_.plan = plan
    text = render_card(card_facts(manifest))
    assert lint_card(text, "README.md", manifest) == []
    assert "| 8 GiB | `-ncmoe 28` (" in text
    assert re.search(r"\n\| 8 GiB \| Q8_0 \| [\d.]+ MB \| `-ncmoe 28` \| 7\.\d\d GiB \| ", text)  # which file
    assert "| all experts in system RAM | `-ngl 99 --cpu-moe` | 1.47 GiB |" in text
    assert "llama-server -m models/tiny-phimoe-Q8_0.gguf -ngl 99 -ncmoe 28 -c 4096\n" in text
    assert ("Without\n`-c`, llama.cpp takes the model's trained context (131072 tokens), whose f16 KV cache alone\n"
            "takes 16.00 GiB: the KV cache grows by 128.00 MiB per 1,024 tokens") in text
    assert "| 32768 | 4.00 GiB |" in text  # 32 layers x 32768 x (K + V) x 1024 wide x 2 bytes
    assert "is the plan's pick for Q8_0 with 8 GiB of GPU memory at context 4096" in text  # not "a 8 GiB GPU"
    one_layer = manifest.model_copy(deep=True)
    one_layer.quants[0].records.quantize.model.block_count = 1
    text = render_card(card_facts(one_layer))
    assert "2 active per token, 1 layer\n" in text and "1 layers" not in text


@pytest.mark.parametrize("body,what", [
    ("{{ 'x' * 10**10 }}", "a repetition of 10,000,000,000 items"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "more than 1 s"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion too deep"),
    ("{% macro d(s, n) %}{% if n %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}"
     "{{ d('x', 40) }}", "more than 256 MiB of memory"),
], ids=["repeat", "loops", "recursion", "doubling"])
def test_a_runaway_template_is_stopped_with_its_line(tmp_path, monkeypatch, body, what):
    """The sandbox has a budget (time, memory, output); small limits here, the real ones in README 'Limits'."""
    from moeq.cards import render

    # The memory case gets time enough that only its memory can stop it: late in a long test process, building
    # 256 MiB of string has taken more than 1 s.
    monkeypatch.setattr(render, "MAX_SECONDS", 30 if "MiB" in what else 1)
    monkeypatch.setattr(render, "MAX_MEMORY", 256 << 20)
    template = tmp_path / "card.md.j2"
    template.write_text("# A card\n\n" + body + "\n")
    with pytest.raises(InputError) as info:
        render.render_card({}, template)
    assert info.value.message.startswith(f"{template}:3: the template ran past its budget ({what}")
    model = {"architecture": "phimoe", "expert_tensors": ["ffn_up_exps"], "shared_experts": []}
    assert render.render_card({"model": model}, REPO / "templates" / "partials" / "cpu-moe.md.j2")  # budget restored


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

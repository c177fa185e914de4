"""Rendering model cards from the tiny model's real records: golden files, what each card lists and links, the
staged folder, missing records and templates.

Golden cards are regenerated with
    MOEQ_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_card_render.py -k golden
and reviewed by eye before committing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from moeq.cards.facts import card_facts
from moeq.cards.lint import lint_card
from moeq.cards.render import render_card
from moeq.manifest import MANIFEST_NAME, read_manifest
from moeq.steps.context import Context
from moeq.errors import CheckFailed, InputError
from moeq.cards.stage import staged_paths

from conftest import REPO, run_moeq
from cards_support import CHARTS, LADDER, card_text, copy_example, ladder_copy, make_cards

GOLDEN = REPO / "tests" / "golden"

@pytest.mark.parametrize("layout,quant", [("single", None), *(("per-quant", q) for q in LADDER)])
def test_golden(carded_ladder, carded_per_quant, layout, quant):
    _, ws, _ = carded_ladder if layout == "single" else carded_per_quant
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


def test_per_quant_cards_link_the_repos_published_together_and_pass_lint(carded_per_quant):
    pipeline, ws, _ = carded_per_quant
    repos = {q: pipeline.repo_id(pipeline.quant(q)) for q in LADDER}
    for quant in LADDER:
        text = card_text(ws, quant)
        manifest = read_manifest(ws.repo_dir(quant) / MANIFEST_NAME)
        assert lint_card(text, "README.md", manifest) == []
        assert hub_links(text) == {*repos.values(), "microsoft/Phi-3.5-MoE-instruct"}
        assert "](../" not in text and "not built" not in text


def test_a_per_quant_card_made_alone_links_no_unpublished_sibling(carded_per_quant, tmp_path):
    """`moeq card --quant Q8_0` (what `build --quant Q8_0 --push` makes) with no sibling pushed: no sibling links."""
    pipeline, ws, _ = carded_per_quant
    outcome = make_cards(pipeline, ("Q8_0",))["Q8_0"]
    text = card_text(ws, "Q8_0")
    assert hub_links(text) == {pipeline.repo_id(pipeline.quant("Q8_0")), "microsoft/Phi-3.5-MoE-instruct"}
    assert "## Other quants of this model" not in text and not outcome.up_to_date
    make_cards(pipeline)  # back to the fixture's cards


def test_the_one_repos_card_lists_the_ladder_and_links_only_itself(carded_ladder):
    pipeline, ws, outcomes = carded_ladder
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


def test_which_file_should_i_choose(carded_ladder):
    """Computed from the plans: on the tiny model every quant fits every GPU size, so one row group holds them."""
    _, ws, _ = carded_ladder
    text = card_text(ws)
    table = text.split("## Which file should I choose?")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[1] for r in rows] == list(LADDER)
    assert rows[0].startswith("| 8 GiB or more | Q8_0 | ") and rows[1].startswith("|  | Q4_K_M | ")
    assert all("| all on the GPU | 1.00 GiB | " in r and r.endswith("| not measured | not measured |") for r in rows)


def test_one_repo_made_for_some_quants_lists_only_those(carded_ladder):
    """A quant not asked for (and never pushed from here) is not in the one repo's card or its staged folder."""
    pipeline, ws, _ = carded_ladder
    outcome = make_cards(pipeline, ("Q4_K_M",))[None]
    assert outcome.record.quants == ["Q4_K_M"]
    assert staged_paths(ws.repo_dir(None)) == sorted(["README.md", MANIFEST_NAME, "tiny-phimoe-Q4_K_M.gguf",
                                                      "tiny-phimoe.imatrix", *CHARTS])
    assert "tiny-phimoe-Q8_0" not in card_text(ws)
    make_cards(pipeline)


def test_staged_folder_holds_exactly_the_repo(carded_ladder, carded_per_quant):
    pipeline, ws, _ = carded_per_quant
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
    pipeline, ws, _ = carded_ladder
    folder = ws.repo_dir(None)
    names = [pipeline.quant(q).file for q in LADDER]
    assert staged_paths(folder) == sorted(["README.md", MANIFEST_NAME, "tiny-phimoe.imatrix", *names, *CHARTS])
    for name in names:
        assert os.path.samefile(folder / name, ws.quant_path(name))
    for name in ("README.md", MANIFEST_NAME):  # a maintainer's folders stay local: no absolute path is published
        published = (folder / name).read_text()
        assert str(ws.root) not in published and str(Path.home()) not in published


def test_frontmatter_round_trips_through_huggingface_hub(carded_ladder, carded_per_quant):
    for (_, ws, _), keys in ((carded_ladder, [None]), (carded_per_quant, LADDER)):
        for key in keys:
            facts = card_facts(read_manifest(ws.repo_dir(key) / MANIFEST_NAME))
            data = ModelCard(card_text(ws, key)).data.to_dict()
            assert data == facts.frontmatter
            assert data["base_model_relation"] == "quantized"
            assert all(q in data["tags"] for q in ([key] if key else LADDER))


def test_second_card_run_is_up_to_date(carded_ladder):
    pipeline, ws, _ = carded_ladder
    before = (ws.repo_dir(None) / "README.md").stat().st_mtime_ns
    assert make_cards(pipeline)[None].up_to_date
    assert (ws.repo_dir(None) / "README.md").stat().st_mtime_ns == before


def test_cli_card_and_json(carded_ladder):
    pipeline, _, _ = carded_ladder
    proc = run_moeq("card", "--config", str(pipeline.path), "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    assert result["skipped"] is True
    assert result["record"]["repo_id"] == "moeq-test/tiny-phimoe-GGUF" and result["record"]["quant"] is None
    assert result["record"]["not_measured"] == [f"{q}: {what} (bench)" for q in LADDER
                                                for what in ("speed", "measured VRAM", "quality")]


# ---------------------------------------------------------------- missing records and facts


@pytest.mark.slow
def test_missing_validate_record_says_not_measured(tmp_path, quantized_ladder):
    pipeline, ws = ladder_copy(quantized_ladder, tmp_path, validate=("Q8_0",))
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


@pytest.mark.slow
def test_stale_validate_record_is_ignored_with_a_warning(tmp_path, quantized_ladder):
    pipeline, ws = ladder_copy(quantized_ladder, tmp_path, validate=("Q8_0",))
    record_path = ws.record_path("validate", "Q8_0")
    data = json.loads(record_path.read_text())
    data["record"]["file"]["sha256"] = "0" * 64
    record_path.write_text(json.dumps(data))
    ctx = Context.of(pipeline)
    outcome = make_cards(pipeline, ("Q8_0",), ctx)[None]
    assert any("describes an older Q8_0 file" in w for w in ctx.warnings)
    assert "memory plan (validate)" in outcome.record.not_measured


def test_card_in_a_fresh_workspace_runs_the_steps_it_needs_first(tmp_path):
    """`moeq card` runs the plan cut at the card: the source, the file and its shards are made first; what the card
    does not need (validate, bench) is not run, and the card says so."""
    config = copy_example(tmp_path)
    proc = run_moeq("card", "--config", str(config), "--quant", "Q8_0", "--json")
    assert proc.returncode == 0, proc.stderr
    records = tmp_path / "work" / "records"
    assert {p.name for p in records.iterdir()} == {"fetch.json", "quantize-Q8_0.json", "shards-Q8_0.json",
                                                   "card.json"}
    [card] = json.loads(proc.stdout)
    assert card["record"]["quants"] == ["Q8_0"]
    assert "memory plan (validate)" in card["record"]["not_measured"]
    assert (tmp_path / "work" / "repos" / "ladder" / "README.md").is_file()


@pytest.mark.slow
def test_template_asking_for_a_missing_fact_names_it(tmp_path, quantized_ladder):
    template = tmp_path / "card.md.j2"
    template.write_text("---\nlicense: mit\n---\n# {{ model.name }}\n\nSize: {{ quant.weight_in_tons }}\n")
    pipeline, ws = ladder_copy(quantized_ladder, tmp_path / "copy", card={"template": str(template)}, validate=())
    with pytest.raises(InputError) as err:
        make_cards(pipeline, ("Q8_0",))
    assert f"{template}:6:" in err.value.message and "weight_in_tons" in err.value.message
    assert not ws.repo_dir(None).exists()


@pytest.mark.slow
def test_card_that_fails_lint_is_not_written(tmp_path, quantized_ladder):
    bad = tmp_path / "bad.md.j2"
    good = (REPO / "templates" / "model-card.md.j2").read_text()
    bad.write_text(good.replace("## Model details", "See [the other quant](../sibling-gguf).\n\n## Model details"))
    pipeline, ws = ladder_copy(quantized_ladder, tmp_path / "copy", card={"template": str(bad)}, validate=())
    with pytest.raises(CheckFailed) as err:
        make_cards(pipeline, ("Q8_0",))
    assert "relative-link" in err.value.message and "was not" in err.value.message
    assert not (ws.repo_dir(None) / "README.md").exists()
    proc = run_moeq("card", "--config", str(pipeline.path), "--quant", "Q8_0")
    assert proc.returncode == 7 and "relative-link" in proc.stderr


@pytest.mark.slow
def test_user_template_can_include_builtin_partials(tmp_path, quantized_ladder):
    template = tmp_path / "mine.md.j2"
    template.write_text("---\n{{ frontmatter | card_yaml }}\n---\n\n# {{ model.name }} {{ quant.type }}\n\n"
                        "{% include 'partials/cpu-moe.md.j2' %}\n")
    pipeline, ws = ladder_copy(quantized_ladder, tmp_path / "copy", card={"template": str(template)}, validate=())
    make_cards(pipeline, ("Q8_0",))
    text = card_text(ws)
    assert text.splitlines()[-1].startswith("layers to fit the GPU")
    assert "# tiny-phimoe Q8_0" in text


def test_memory_section_on_the_real_models_layout(good_card):
    """The fit table and the -ncmoe example, on Phi-3.5-MoE's real tensor layout in Q8_0 (header only)."""
    import gguf

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
    _, manifest = good_card
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
        render.render_card(SimpleNamespace(), template)
    assert info.value.where == f"{template}:3"
    assert info.value.problem.startswith(f"the template ran past its budget ({what}")
    model = {"architecture": "phimoe", "expert_tensors": ["ffn_up_exps"], "shared_experts": []}
    assert render.render_card(SimpleNamespace(model=model), REPO / "templates" / "partials" / "cpu-moe.md.j2")  # budget restored


@pytest.mark.parametrize("name", ["blk.0.evil|name.weight", "a`|`b", "x<script>alert(1)</script>|y", "`|||`"])
def test_a_hostile_tensor_name_stays_in_its_table_cell(name):
    """A tensor name from a source GGUF reaches the card's recipe and validation tables: it stays one cell, as text."""
    from markdown_it import MarkdownIt
    from moeq.cards.render import cell_code

    table = f"| Tensor | Type |\n| --- | --- |\n| {cell_code(name)} | Q4_K |\n"
    html = MarkdownIt("commonmark").enable("table").render(table)
    body = html.split("<tbody>")[1]
    assert body.count("<td>") == 2 and "<script>" not in html, html
    assert "<td><code>" + name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") \
        + "</code></td>" in body.replace("<code> ", "<code>").replace(" </code>", "</code>"), html


def test_every_command_the_card_prints_is_shell_quoted(carded_ladder):
    """Hostile round 3: the card's commands were joined with spaces, so a pattern or a name with shell characters,
    pasted into a shell, piped and ran a substitution. Each is quoted: a shell splits it back into the very command."""
    import shlex

    _pipeline, ws, _ = carded_ladder
    manifest = read_manifest(ws.repo_dir(None) / MANIFEST_NAME)
    entry = manifest.quants[0]
    hostile = ["llama-quantize", "--tensor-type", "^blk\\.0\\.attn_v\\.weight$|x=q8_0", "--imatrix", "a b`id`.imatrix",
               "in.gguf", "out $(touch pwned).gguf", "Q8_0"]
    quantize = entry.records.quantize.model_copy(update={"command": hostile})
    records = entry.records.model_copy(update={"quantize": quantize})
    manifest = manifest.model_copy(update={"quants": [entry.model_copy(update={"records": records}),
                                                      *manifest.quants[1:]]})
    command = card_facts(manifest).quants[0].quantization.command
    assert shlex.split(command) == hostile and "'out $(touch pwned).gguf'" in command


def test_the_facts_are_typed_down_to_each_row(good_card):
    """Each section is a dataclass; only the frontmatter, card.extra and the calibration sources (records' own
    shape) are plain mappings."""
    import dataclasses

    _, manifest = good_card
    facts = card_facts(manifest)
    mappings = []

    def walk(value, path):
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f"{path}.{f.name}")
        elif isinstance(value, dict):
            mappings.append(re.sub(r"\[\d+\]", "[]", path))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")

    walk(facts, "facts")
    assert set(mappings) <= {"facts.frontmatter", "facts.extra", "facts.quants[].imatrix.made.calibration.sources[]",
                             "facts.quant.imatrix.made.calibration.sources[]",
                             "facts.imatrix_files[].made.calibration.sources[]"}, mappings
    assert facts.quant.quantization.type_mix[0].tensors > 0 and facts.quant.validation.checks[0].ok


@pytest.mark.parametrize("rendered,as_json", [
    ("<|user|>\nhi<|end|>\n<|assistant|>\n", False),
    ("<|user|>  \nhi", True),  # trailing spaces: card lint's trailing-whitespace would refuse the card
    ("=======\n<<<<<<< user\nhi\n>>>>>>>", True),  # lines card lint reads as a merge conflict
])
def test_a_rendered_prompt_a_card_cannot_hold_as_it_is_is_shown_as_a_json_string(rendered, as_json):
    """The template is the file's: what it renders must not make the card fail lint (nor be written as it is)."""
    from types import SimpleNamespace

    from moeq.cards.facts.prompt import prompt_facts
    from moeq.records import PromptFormat

    prompt = PromptFormat(template_sha256="0" * 64, template_chars=10, rendered=rendered)
    entry = SimpleNamespace(records=SimpleNamespace(validate_=SimpleNamespace(prompt=prompt, sampling={})))
    facts = prompt_facts([entry])
    assert facts.as_json is as_json
    assert facts.text == (json.dumps(rendered) if as_json else rendered)
    assert prompt_facts([SimpleNamespace(records=SimpleNamespace(validate_=None))]) is None


def test_the_chat_request_is_one_shell_command_sending_the_records_conversation_and_sampling():
    """The card's curl line is built from a record (untrusted): a quote, backticks or a newline in a message
    must still give one command whose JSON body is the conversation and the files' sampling defaults."""
    import shlex

    from moeq.cards.facts.prompt import chat_request

    messages = [{"role": "system", "content": "It's ```sh\n'; rm -rf ~; echo '"},
                {"role": "user", "content": "<<<<<<< Ünïcode \\ \"quoted\""}]
    sampling = {"temp": 0.7, "top_k": 40, "penalty_repeat": 1.1, "sequence": "edkypmxt"}
    words = shlex.split(chat_request(messages, sampling))
    assert words[:2] == ["curl", "-s"] and words[2].endswith("/v1/chat/completions") and words[-2] == "-d"
    body = json.loads(words[-1])
    assert body == {"messages": messages, "temperature": 0.7, "top_k": 40, "repeat_penalty": 1.1}


@pytest.mark.parametrize("rpc,mode,stddev,shown,quoted", [
    (False, "gpu", 0.5, "12.00 ± 0.50", "12.00"),
    (False, "gpu", 11.0, "too noisy to quote", None),  # a spread like 14,033 ± 11,352 is no figure
    (True, "gpu", 0.5, "not measured on a GPU (a CPU stood in for it)", None),  # the RPC stand-in is a CPU
    (True, "cpu", 0.5, "12.00 ± 0.50", "12.00"),  # the CPU mode is what it says, stand-in or not
])
def test_which_file_quotes_only_a_speed_measured_on_a_gpu_and_not_noisy(rpc, mode, stddev, shown, quoted):
    from types import SimpleNamespace

    from moeq.cards.facts.choose import generation_speed
    from moeq.cards.facts.shared import speed_text
    from moeq.records import SpeedTest

    test = SpeedTest(test="tg16", n_prompt=0, n_gen=16, avg_ts=12.0, stddev_ts=stddev, samples_ts=[12.0], n_threads=2,
                     n_cpu_moe=0, n_gpu_layers=99)
    bench = SimpleNamespace(options=SimpleNamespace(rpc=rpc), speed=[SimpleNamespace(mode=mode, tests=[test])])
    assert generation_speed(bench, mode) == (shown, quoted)
    assert speed_text(SimpleNamespace(tests=[test])).endswith(" (noisy)") == (stddev > 3)

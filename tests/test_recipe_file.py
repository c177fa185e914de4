"""`quants[].recipe: PATH`: a recipe file made before (moeq's own, or anyone's, in llama-quantize's
--tensor-type-file syntax) applied over the type's mixture, without searching; its bad inputs, each a one-line
error naming the file and the item; the file published beside the quant, and validated against it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from moeq.errors import InputError
from moeq.recipe_file import check_recipe

from conftest import pipeline_file, run_moeq


def error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines, proc.stderr
    return lines[-1]


@pytest.mark.parametrize("text,message", [
    ("attn_v\n", "'attn_v' is not REGEX=TYPE; fix the item or quants[0].recipe"),
    ("attn_v=q9_k\n", "'attn_v=q9_k': 'q9_k' is not a type a tensor can be quantized to"),
    ("(attn_.)+=q8_0\n", "mine.recipe: '(attn_.)+' repeats a group"),
    # hostile round 3: patterns that spun moeq's own regex for over a minute before llama-quantize started
    ("^token_embd\\.weight$|" + ".*" * 40 + "=q8_0\n", "repeats 40 times ('*', '+', '?'); a tensor pattern may repeat "
     "at most 2 times"),
    ("[a-z._0-9]*" * 14 + "=q8_0\n", "repeats 14 times"),
    ("blk\\.(0|(1))\\.attn_v=q8_0\n", "nests a group in a group"),
    ("attn_v\\1=q8_0\n", "has '\\1'; escape only punctuation"),
    # read as llama-quantize reads it: items end at C whitespace only, and a NUL would cut one short
    ("attn_v=q8_0\u00a0attn_k=q8_0\n", "'q8_0\\xa0attn_k=q8_0' is not a type a tensor can be quantized to"),
    ("attn_v=q8_0\x1cattn_k=q8_0\n", "'q8_0\\x1cattn_k=q8_0' is not a type a tensor can be quantized to"),
    ("attn_v=q8_0\x00\n", "holds a NUL byte, where llama-quantize would cut an item short"),
    ("attn_v=i32\n", "'attn_v=i32': 'i32' is not a type a tensor can be quantized to"),
    ("attn_v=q8_k\n", "'q8_k' is not a type a tensor can be quantized to"),
    ("attn_[v=q8_0\n", "mine.recipe: 'attn_[v' is not a valid pattern"),
    ("\n\n", "no REGEX=TYPE item; a recipe file names the tensors it types"),
])
def test_a_recipe_file_llama_quantize_would_refuse_is_a_config_error(tmp_path, text, message):
    recipe = tmp_path / "mine.recipe"
    recipe.write_text(text)
    config = pipeline_file(tmp_path, trained=False, quants=[{"type": "Q4_K_M", "recipe": "mine.recipe"}])
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2, proc.stdout
    line = error_line(proc)
    assert "quants[0].recipe: " in line and str(recipe) in line and message in line, line


def test_a_budget_is_for_a_search_only(tmp_path):
    (tmp_path / "mine.recipe").write_text("attn_v=q8_0\n")
    config = pipeline_file(tmp_path, trained=False,
                           quants=[{"type": "Q4_K_M", "recipe": "mine.recipe", "budget": "stock"}])
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2
    assert "quants[0].budget: a budget is for a searched recipe (recipe: search), not a recipe file" in error_line(proc)


@pytest.mark.parametrize("text,message", [
    ("^blk\\.0\\.attn_q\\.weight$=q8_0\nffn_up_shexp=q8_0\n",
     "'ffn_up_shexp' matches no weight tensor of tiny-phimoe-F16.gguf; fix the pattern (llama-quantize searches it in "
     "names such as "),
    ("ffn_gate_inp=q8_0\n", "'ffn_gate_inp' matches no weight tensor of tiny-phimoe-F16.gguf"),  # the router
])
def test_a_recipe_that_does_not_fit_the_model_is_refused_before_quantizing(tmp_path, toolchain, text, message):
    recipe = tmp_path / "mine.recipe"
    recipe.write_text(text)
    config = pipeline_file(tmp_path, trained=False, quants=[{"type": "Q4_K_M", "recipe": "mine.recipe"}])
    proc = run_moeq("quantize", "--config", str(config), "--quant", "Q4_K_M")
    assert proc.returncode == 3, proc.stderr
    assert error_line(proc).startswith(f"error: {recipe}: {message}")
    assert not list((tmp_path / "work" / "quants").glob("*.gguf"))


def test_a_type_a_tensors_rows_cannot_hold_is_refused(tmp_path):
    """Qwen1.5-MoE's experts are 1,408 wide: Q4_K's blocks of 256 do not fit their rows, and llama-quantize would
    quietly make them Q5_0. (moeq's synthetic models are 256-aligned, so this header is written out by hand.)"""
    header = SimpleNamespace(tensors=[SimpleNamespace(name="blk.0.ffn_down_exps.weight", shape=(1408, 2048, 60)),
                                      SimpleNamespace(name="blk.0.attn_q.weight", shape=(2048, 2048))])
    recipe = [("attn_q", "Q4_K"), ("ffn_down_exps", "Q4_K")]
    with pytest.raises(InputError) as caught:
        check_recipe(recipe, header, tmp_path / "qwen.recipe", tmp_path / "qwen2moe-F16.gguf")
    assert caught.value.message == (f"{tmp_path / 'qwen.recipe'}: blk.0.ffn_down_exps.weight cannot be Q4_K: its rows "
                                    "of 1408 values are not a multiple of Q4_K's block of 256; give it another type")
    check_recipe([("attn_q", "Q4_K"), ("ffn_down_exps", "Q8_0")], header, tmp_path / "q.recipe", tmp_path / "m.gguf")


def test_a_recipe_file_is_applied_over_the_mixture_published_and_validated(tmp_path, toolchain):
    recipe = tmp_path / "attention-q8.recipe"
    recipe.write_text("^blk\\.1\\.attn_v\\.weight$=q8_0\nattn_q=q6_k attn_k=q6_k\n")  # space-separated items too
    config = pipeline_file(tmp_path, trained=False, quants=[{"type": "Q4_K_M", "recipe": str(recipe)}])
    proc = run_moeq("build", "--config", str(config), "--quant", "Q4_K_M", "--skip-bench", "--json")
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "work"
    quantized = json.loads((work / "records" / "quantize-Q4_K_M.json").read_text())["record"]
    assert quantized["options"]["pure"] is False and quantized["options"]["tensor_type_file"]["size"] == \
        recipe.stat().st_size
    assert quantized["command"][quantized["command"].index("--tensor-type-file") + 1] == str(recipe.resolve())
    types = {row["name"]: row["type_after"] for row in quantized["tensors"]}
    assert types["blk.1.attn_v.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q6_K"
    assert types["blk.0.attn_v.weight"] in ("Q4_K", "Q6_K")  # not named: llama.cpp's Q4_K_M mixture
    assert types["blk.0.ffn_gate_exps.weight"] == "Q4_K"
    validated = json.loads((work / "records" / "validate-Q4_K_M.json").read_text())["record"]
    assert validated["ok"], validated["checks"]
    repo = work / "repos" / "ladder"
    assert (repo / "attention-q8.recipe").read_bytes() == recipe.read_bytes()
    card = (repo / "README.md").read_text()
    assert "| [attention-q8.recipe](" in card and "applied over llama.cpp's mixture for Q4_K_M" in card
    assert "llama-server -hf moeq-test/tiny-phimoe-GGUF:Q4_K_M " in card  # a recipe file is not moeq's search


def test_validate_fails_a_file_whose_types_are_not_the_recipes(tmp_path, toolchain):
    """The type-mix check holds each tensor to the recipe's type: a recipe that says otherwise fails it, naming the
    tensor and both types."""
    recipe = tmp_path / "mine.recipe"
    recipe.write_text("^blk\\.1\\.attn_v\\.weight$=q8_0\n")
    config = pipeline_file(tmp_path, trained=False, quants=[{"type": "Q4_K_M", "recipe": str(recipe)}])
    assert run_moeq("quantize", "--config", str(config), "--quant", "Q4_K_M").returncode == 0
    from moeq.validate.checks import check_type_mix
    from moeq.gguf_header import read_header

    header = read_header(tmp_path / "work" / "quants" / "tiny-phimoe-Q4_K_M.gguf")
    assert check_type_mix(header, "Q4_K_M", {r"^blk\.1\.attn_v\.weight$": "Q8_0"}).ok
    wrong = check_type_mix(header, "Q4_K_M", {r"^blk\.1\.attn_v\.weight$": "Q5_K"})
    assert not wrong.ok and "blk.1.attn_v.weight is Q8_0, the Q4_K_M recipe gives Q5_K" in wrong.detail


@pytest.mark.parametrize("name", ["mine|`id`.recipe", "my recipe.recipe", "r\u00e9cipe.recipe"])
def test_a_recipe_file_name_the_hub_would_misread_is_refused(tmp_path, name):
    """Hostile round 3: a recipe file's name was published as given (a `|` broke its link on the card)."""
    (tmp_path / name).write_text("attn_v=q8_0\n")
    config = pipeline_file(tmp_path, trained=False, quants=[{"type": "Q4_K_M", "recipe": name}])
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2, proc.stdout
    line = error_line(proc)
    assert "quants[0].recipe: " in line and "a recipe file is published under its name" in line, line

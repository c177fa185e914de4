"""The recipe search: groups, options and the choice under a budget (pure arithmetic), and `moeq recipe` on the
trained example with the real llama-quantize and llama-perplexity, in a small space."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeq.texts import shipped_calibration
from moeq.texts import shipped_evaluation
from moeq.recipe_file import recipe_types
from moeq.recipe.search import Group, Ladder, Option, groups_of, predicted, recipe_lines, solve, stepped
from moeq.recipe_file import (NEEDS_IMATRIX_ENTRY, SEARCH_TYPES, pure_ftype, search_problem, type_bits)
from moeq.texts import shipped_selection

from conftest import REPO, default_sigint, example_section, pipeline_file, run_moeq

SMALL = {"ctx": 128, "chunks": 4, "max_evals": 12}


def error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines
    return lines[-1]


def lines_of(path: Path) -> set[str]:
    """Its lines of text (40 characters or more, 20 of them letters or digits: not a table's border)."""
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if len(line.strip()) >= 40 and sum(c.isalnum() for c in line) >= 20}


def test_the_selection_text_shares_no_line_with_the_other_texts():
    """Calibration (the imatrix), selection (the search) and evaluation (the published figures) are disjoint, and
    none is the tiny model's training text."""
    texts = {"calibration": shipped_calibration(), "selection": shipped_selection(),
             "evaluation": shipped_evaluation(), "training": REPO / "moeq" / "data" / "training-text.txt"}
    lines = {name: lines_of(path) for name, path in texts.items()}
    assert len(lines["selection"]) > 300
    for name in ("calibration", "evaluation", "training"):
        assert lines["selection"] & lines[name] == set(), name
    assert lines["calibration"] & lines["evaluation"] == set()


def test_groups_are_per_layer_band_and_category():
    stock = {f"blk.{i}.{c}.weight": "Q2_K" for i in range(5) for c in ("attn_q", "ffn_down_exps")}
    stock |= {"token_embd.weight": "Q2_K", "output.weight": "Q6_K"}
    groups = {g.name: g.tensors for g in groups_of(stock, n_layer=5, layers_per_group=2)}
    assert groups["blk.0-1.attn_q"] == ("blk.0.attn_q.weight", "blk.1.attn_q.weight")
    assert groups["blk.4.ffn_down_exps"] == ("blk.4.ffn_down_exps.weight",)  # the last band holds what is left
    assert groups["token_embd"] == ("token_embd.weight",) and len(groups) == 8
    ladder = Ladder(imatrix=True, ncols={})
    assert stepped(stock, Group("output", ("output.weight",)), 1, ladder) == {"output.weight": "Q8_0"}
    assert stepped({"output.weight": "Q8_0"}, Group("output", ("output.weight",)), 1, ladder) is None  # the top


@pytest.mark.parametrize("stock,imatrix,name,ncols,moves", [
    ("Q2_K", True, "blk.0.ffn_up_exps.weight", 256, {-1: "IQ2_S", 0: "Q2_K", 1: "IQ3_XXS"}),
    ("Q3_K", True, "blk.0.ffn_down_exps.weight", 512, {-1: "IQ3_XXS", 0: "Q3_K", 1: "IQ4_XS"}),
    ("IQ3_XXS", True, "blk.0.attn_q.weight", 256, {-1: "Q2_K", 0: "IQ3_XXS", 1: "IQ3_S"}),  # IQ3_S: Q3_K's size
    ("IQ4_XS", True, "blk.0.attn_q.weight", 256, {-1: "IQ3_S", 0: "IQ4_XS", 1: "Q4_K"}),
    ("Q4_K", True, "blk.0.attn_q.weight", 256, {-1: "IQ4_XS", 0: "Q4_K", 1: "Q5_K"}),
    ("IQ1_S", True, "blk.0.attn_q.weight", 256, {0: "IQ1_S", 1: "IQ1_M"}),
    # without an importance matrix no type that needs its entry, but for token_embd and output
    ("Q2_K", False, "blk.0.ffn_up_exps.weight", 256, {0: "Q2_K", 1: "Q3_K"}),
    ("Q3_K", False, "blk.0.attn_q.weight", 256, {-1: "Q2_K", 0: "Q3_K", 1: "IQ4_XS"}),
    ("Q2_K", False, "token_embd.weight", 256, {-1: "IQ2_S", 0: "Q2_K", 1: "IQ3_XXS"}),
    # rows of 96 values hold no block of 256: from Q8_0, nothing on the ladder
    ("Q8_0", True, "blk.0.attn_k.weight", 96, {0: "Q8_0"}),
])
def test_a_tensor_moves_to_the_next_type_by_bits_per_weight_it_can_take(stock, imatrix, name, ncols, moves):
    assert Ladder(imatrix, {name: ncols}).moves(name, stock) == moves


def test_the_ladder_is_ordered_by_bits_per_weight_and_the_rungs_it_searches_are_its_base_types():
    bits = [type_bits(t) for t in SEARCH_TYPES]
    assert bits == sorted(bits) and bits[0] < 2 and SEARCH_TYPES[-1] == "Q8_0"
    assert search_problem("IQ3_M") is None and search_problem("Q4_K_S") is None and search_problem("Q2_K") is None
    assert "IQ4_NL's tensors are IQ4_NL, which is not among them" in search_problem("IQ4_NL")
    assert "MXFP4_MOE's tensors are MXFP4" in search_problem("MXFP4_MOE")
    assert [pure_ftype(t) for t in ("IQ2_S", "IQ3_S", "Q4_K", "Q3_K")] == ["IQ2_M", "IQ3_S", "Q4_K", "Q3_K"]


def test_the_types_that_need_an_importance_matrix_entry_are_the_pinned_builds(tmp_path, toolchain):
    """recipe_file.NEEDS_IMATRIX_ENTRY is what `llama-quantize --dry-run` says "will require an imatrix" for, given to
    one layer tensor of every ladder type; token_embd and output never require one."""
    from moeq.quant_types import mixture
    from moeq.synth import SynthSpec, write_synth_model

    model = write_synth_model(tmp_path / "tiny-F16.gguf", SynthSpec())
    tool = toolchain.path("llama-quantize")
    needs = {t for t in SEARCH_TYPES
             if mixture(tool, model, "Q8_0", ["--pure", "--tensor-type", rf"blk\.0\.attn_q\.weight={t}"]).requires_imatrix}
    assert needs == NEEDS_IMATRIX_ENTRY
    ends = ["--pure", "--token-embedding-type", "iq1_s", "--output-tensor-type", "iq2_xxs"]
    assert not mixture(tool, model, "Q8_0", ends).requires_imatrix


def test_the_choice_under_a_budget_takes_the_best_measured_trade():
    stock = 0.070
    options = {
        "token_embd": [Option("token_embd", 0, (), 0, stock), Option("token_embd", 1, (), 100, 0.050)],
        "output": [Option("output", 0, (), 0, stock), Option("output", -1, (), -80, 0.071)],
        "ffn": [Option("ffn", 0, (), 0, stock), Option("ffn", -1, (), -200, 0.090)],
    }
    chosen = solve(options, spare_bytes=20, stock_kld=stock)  # embd up (+100) pays for itself with output down (-80)
    assert {g: o.step for g, o in chosen.items()} == {"token_embd": 1, "output": -1, "ffn": 0}
    assert predicted(chosen, stock) == pytest.approx(0.051)
    assert {o.step for o in solve(options, spare_bytes=1000, stock_kld=stock).values()} == {0, 1}  # room: no loss
    assert {g: o.step for g, o in solve(options, -250, stock).items()} == {"token_embd": 0, "output": -1, "ffn": -1}
    assert solve(options, spare_bytes=-10_000, stock_kld=stock) == {}


def test_a_gpu_budget_limits_the_bytes_on_the_gpu_as_well():
    """Attention (on the GPU with --cpu-moe) one type up is the better trade per byte, but it adds GPU bytes; the
    experts' one (system RAM) adds none."""
    options = {
        "blk.0.attn_q": [Option("blk.0.attn_q", 0, (), 0, 0.1), Option("blk.0.attn_q", 1, (), 50, 0.07, None, 50),
                         Option("blk.0.attn_q", -1, (), -50, 0.105, None, -50)],
        "blk.0.ffn_up_exps": [Option("blk.0.ffn_up_exps", 0, (), 0, 0.1), Option("blk.0.ffn_up_exps", 1, (), 100, 0.08),
                              Option("blk.0.ffn_up_exps", -1, (), -100, 0.104)],
    }
    steps = lambda chosen: {g: o.step for g, o in chosen.items()}  # noqa: E731
    assert steps(solve(options, 0, 0.1)) == {"blk.0.attn_q": 1, "blk.0.ffn_up_exps": -1}
    assert steps(solve(options, 0, 0.1, spare_gpu=50)) == {"blk.0.attn_q": 1, "blk.0.ffn_up_exps": -1}
    assert steps(solve(options, 0, 0.1, spare_gpu=0)) == {"blk.0.attn_q": 0, "blk.0.ffn_up_exps": 0}
    assert steps(solve(options, 60, 0.1, spare_gpu=-50)) == {"blk.0.attn_q": -1, "blk.0.ffn_up_exps": 1}
    assert solve(options, -200, 0.1, spare_gpu=0) == {}  # nothing gives up 200 bytes


@pytest.mark.parametrize("gpu", [False, True])
def test_the_solver_finds_what_brute_force_finds(gpu):
    """On 400 random instances of up to 7 groups of one to three options (a tenth of them with no fitting recipe),
    the solver's recipe fits and predicts exactly the best divergence of every fitting combination, where the
    Lagrangian relaxation it replaced missed the best whole-option recipe."""
    rng = random.Random(40 + gpu)
    for _ in range(400):
        stock = rng.uniform(0.01, 0.2)
        options = {}
        for g in range(rng.randint(1, 7)):
            opts = [Option(f"g{g}", 0, (), 0, stock)]
            for step in rng.sample([1, -1], rng.randint(0, 2)):
                size = rng.randint(1, 500) * step
                opts.append(Option(f"g{g}", step, (), size, stock - step * rng.uniform(-0.002, 0.03),
                                   None, size * rng.randint(0, 1) if gpu else 0))
            options[f"g{g}"] = opts
        spare = rng.randint(-800, 300)
        spare_gpu = rng.randint(-300, 300) if gpu else None
        fits = [dict(zip(options, combo)) for combo in itertools.product(*options.values())
                if sum(o.delta_bytes for o in combo) <= spare
                and (spare_gpu is None or sum(o.delta_gpu for o in combo) <= spare_gpu)]
        chosen = solve(options, spare, stock, spare_gpu)
        if not fits:
            assert chosen == {}
            continue
        assert sum(o.delta_bytes for o in chosen.values()) <= spare
        assert spare_gpu is None or sum(o.delta_gpu for o in chosen.values()) <= spare_gpu
        assert predicted(chosen, stock) == pytest.approx(min(predicted(f, stock) for f in fits), abs=1e-12)


@pytest.mark.slow
def test_a_search_under_a_gpu_budget_keeps_the_gpu_bytes_within_it(tmp_path, toolchain):
    from moeq.gguf_header import read_header
    from moeq.memory_plan import DEFAULT_COMPUTE_ALLOWANCE, kv_bytes, on_gpu

    stock = pipeline_file(tmp_path / "stock", trained=False, quants=[{"type": "Q2_K"}])
    assert run_moeq("quantize", "--config", str(stock), "--quant", "Q2_K").returncode == 0
    rows = json.loads((tmp_path / "stock" / "work" / "records" / "quantize-Q2_K.json").read_text())["record"]["tensors"]
    stock_gpu = sum(row["bytes_after"] for row in rows if on_gpu(row["name"], 2))
    kv = kv_bytes(read_header(tmp_path / "stock" / "work" / "source" / "tiny-phimoe-F16.gguf"), 512)
    room = stock_gpu - 20_000  # the stock file's GPU tensors do not fit: some must go down
    budget = {"gpu": f"{DEFAULT_COMPUTE_ALLOWANCE + kv + room}B", "placement": "cpu-moe", "ctx": 512}
    quants = [{"type": "Q2_K", "recipe": "search", "budget": budget}]
    config = pipeline_file(tmp_path / "gpu", trained=False, quants=quants, recipe={**SMALL, "max_evals": 40})
    proc = run_moeq("recipe", "--config", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)[0]["record"]
    assert record["gpu_budget_bytes"] == room
    evals = record["evals"]
    assert evals[0]["gpu_bytes"] == stock_gpu > room  # the stock recipe does not fit
    chosen = evals[record["chosen"]]
    assert chosen["gpu_bytes"] <= room and chosen["tensor_bytes"] <= record["budget_bytes"]
    fits = [e["quality"]["kld_mean"] for e in evals if e["gpu_bytes"] <= room and e["tensor_bytes"] <= record[
        "budget_bytes"]]
    assert chosen["quality"]["kld_mean"] == min(fits)
    tight = pipeline_file(tmp_path / "tight", trained=False, quants=[
        {"type": "Q2_K", "recipe": "search", "budget": {**budget, "gpu": f"{DEFAULT_COMPUTE_ALLOWANCE + kv}B"}}])
    proc = run_moeq("recipe", "--config", str(tight))
    assert proc.returncode == 3
    assert "quants[Q2_K].budget.gpu: " in error_line(proc) and "take it all; raise gpu or lower ctx" in error_line(proc)
    unreachable = pipeline_file(tmp_path / "unreachable", trained=False, quants=[
        {"type": "Q2_K", "recipe": "search", "budget": {**budget, "gpu": f"{DEFAULT_COMPUTE_ALLOWANCE + kv + 1000}B"}}])
    proc = run_moeq("recipe", "--config", str(unreachable))
    assert proc.returncode == 3
    assert error_line(proc).startswith("error: quants[Q2_K].budget: 1,000 bytes for the weights on the GPU (after the KV "
                                       "cache and the compute allowance), less than the search reaches")
    assert not list((tmp_path / "unreachable" / "work" / "recipe" / "Q2_K" / "evals").glob("*.json"))


def test_recipe_lines_name_each_tensor_anchored_as_llama_quantize_reads_them():
    types = {"blk.1.attn_output.weight": "Q3_K", "blk.1.attn_q.weight": "Q2_K", "output.weight": "Q5_K",
             "token_embd.weight": "Q3_K"}
    lines = recipe_lines(types, "Q2_K")
    assert lines == [("^blk\\.1\\.attn_output\\.weight$", "q3_k")]  # token_embd and output have their own flags
    names = [*types, "blk.11.attn_output.weight"]
    assert recipe_types(lines, names) == {"blk.1.attn_output.weight": "Q3_K"}  # not blk.11, not output


@pytest.fixture(scope="module")
def searched(tmp_path_factory, toolchain):
    folder = tmp_path_factory.mktemp("search")
    quants = [q if not isinstance(q, dict) or q["type"] != "Q2_K" else {**q, "recipe": "search", "budget": "stock"}
              for q in example_section("quants")]
    config = pipeline_file(folder, quants=quants, recipe=SMALL)
    proc = run_moeq("recipe", "--config", str(config), "--quant", "Q2_K", "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    return config, result["record"]


def test_a_search_measures_within_its_bounds_and_keeps_every_figure(searched):
    config, record = searched
    evals = record["evals"]
    assert evals[0]["label"] == "stock" and evals[0]["changes"] == {}
    assert 3 <= len(evals) <= SMALL["max_evals"] and record["runs"] == len(evals)
    chosen = evals[record["chosen"]]
    assert chosen["tensor_bytes"] <= record["budget_bytes"] == sum(
        json.loads((config.parent / "work" / "records" / "quantize-Q2_K-with-imatrix.json").read_text())
        ["record"]["tensors"][i]["bytes_after"] for i in range(39))
    fits = [e["quality"]["kld_mean"] for e in evals if e["tensor_bytes"] <= record["budget_bytes"]]
    assert chosen["quality"]["kld_mean"] == min(fits)
    assert record["selection"]["text"] == "selection.txt" and record["selection"]["ctx"] == SMALL["ctx"]
    types = record["tensor_types"]
    assert types == {**record["stock_types"], **chosen["changes"]}


def test_a_plan_after_the_search_says_it_is_up_to_date_and_what_it_chose(searched):
    config, record = searched
    proc = run_moeq("recipe", "--config", str(config), "--quant", "Q2_K", "--plan", "--json")
    assert proc.returncode == 0, proc.stderr
    [planned] = json.loads(proc.stdout)
    chosen = record["evals"][record["chosen"]]
    assert planned["up_to_date"] is True and planned["chosen"]["label"] == chosen["label"]
    assert planned["chosen"]["kld_mean"] == chosen["quality"]["kld_mean"]
    text = run_moeq("recipe", "--config", str(config), "--quant", "Q2_K", "--plan").stdout.replace("\n", " ")
    assert text.startswith("Q2_K: up to date: ") and f"chosen: {chosen['label']}, mean KLD" in text


def test_the_published_command_rebuilds_the_searched_file_byte_for_byte(searched, toolchain, tmp_path):
    config, record = searched
    work = config.parent / "work"
    recipe = Path(record["recipe_file"]["path"])
    recipe = recipe if recipe.is_absolute() else work / recipe
    searched_file = Path(record["output"]["path"])
    searched_file = searched_file if searched_file.is_absolute() else work / searched_file
    command = [str(toolchain.path("llama-quantize")), *record["command"][1:]]
    assert command[1:4] == ["--pure", "--imatrix", "tiny-phimoe.imatrix"]
    command[command.index(recipe.name)] = str(recipe)
    command[-3:] = [str(work / "source" / "tiny-phimoe-F16.gguf"), str(tmp_path / "rebuilt.gguf"), "Q2_K"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=work / "imatrix", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    digest = hashlib.sha256((tmp_path / "rebuilt.gguf").read_bytes()).hexdigest()
    assert digest == hashlib.sha256(searched_file.read_bytes()).hexdigest()
    for pattern, ggml_type in (line.split("=") for line in recipe.read_text().splitlines()):
        name = re.fullmatch(r"\^(.+)\$", pattern).group(1).replace("\\", "")
        assert record["tensor_types"][name] == ggml_type.upper()


def test_a_search_runs_once_and_an_interrupted_one_continues(searched):
    config, record = searched
    again = run_moeq("recipe", "--config", str(config), "--quant", "Q2_K", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)[0]["skipped"] is True
    saved = config.parent / "work" / "records" / "recipe-Q2_K.json"
    saved.unlink()  # as after a kill: every measurement made so far is on disk, the record is not
    resumed = run_moeq("recipe", "--config", str(config), "--quant", "Q2_K", "--json")
    assert resumed.returncode == 0, resumed.stderr
    remade = json.loads(resumed.stdout)[0]["record"]
    assert remade["runs"] == 0 and remade["evals"] == record["evals"] and remade["chosen"] == record["chosen"]


@pytest.mark.parametrize("tamper", ["forged", "cut short", "nan", "another recipe's"])
def test_a_saved_measurement_moeq_did_not_make_is_measured_again(searched, tamper):
    """Hostile round 3: a saved result edited to a better figure was trusted and chosen. A saved result is sealed
    by this machine's moeq and re-parsed from the tool's own lines; anything else is measured again."""
    config, record = searched
    evals = sorted((config.parent / "work" / "recipe" / "Q2_K" / "evals").glob("*.json"))
    worst = max(range(len(record["evals"])), key=lambda i: record["evals"][i]["quality"]["kld_mean"])
    victim = evals[0]
    text = victim.read_text()
    if tamper == "forged":  # the figure a worse recipe would need to be chosen, written into its saved lines
        outer = json.loads(text)
        outer["payload"] = re.sub(r"Mean\s+KLD:\s*[\d.e-]+", "Mean    KLD:   0.000000001", outer["payload"])
        victim.write_text(json.dumps(outer))
    elif tamper == "cut short":
        victim.write_text(text[: len(text) // 2])
    elif tamper == "nan":
        victim.write_text('{"kld_mean": NaN, "command": []}')
    else:
        victim.write_text(evals[1].read_text())
    (config.parent / "work" / "records" / "recipe-Q2_K.json").unlink()
    again = run_moeq("recipe", "--config", str(config), "--quant", "Q2_K", "--json")
    assert again.returncode == 0, again.stderr
    remade = json.loads(again.stdout)[0]["record"]
    assert remade["runs"] == 1  # that one measurement, made again; every other one sealed and kept
    assert [e["quality"]["kld_mean"] for e in remade["evals"]] == [e["quality"]["kld_mean"] for e in record["evals"]]
    assert remade["chosen"] == record["chosen"] != worst


@pytest.mark.slow
def test_sigint_mid_search_leaves_whole_files_and_the_next_run_continues(tmp_path, toolchain):
    quants = [{"type": "Q2_K", "imatrix": "auto", "recipe": "search", "budget": "stock"}]
    # Every group measured, on more tokens: a search of 30 seconds or so, long enough to be interrupted in.
    config = pipeline_file(tmp_path, quants=quants, recipe={**SMALL, "chunks": 16, "max_evals": 40})
    evals = tmp_path / "work" / "recipe" / "Q2_K" / "evals"
    proc = subprocess.Popen([sys.executable, "-m", "moeq", "recipe", "--config", str(config)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 300
    while len(list(evals.glob("*.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert len(list(evals.glob("*.json"))) >= 3, "the search never measured three recipes"
    assert proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted by SIGINT" in err and "Traceback" not in err, err
    work = tmp_path / "work"
    assert not list(work.rglob("*.partial")) and not (work / "recipe" / "Q2_K" / "candidate.gguf").exists()
    assert not (work / "records" / "recipe-Q2_K.json").exists()
    measured = len(list(evals.glob("*.json")))
    for saved in evals.glob("*.json"):
        json.loads(saved.read_text())  # each whole
    again = run_moeq("recipe", "--config", str(config), "--json")
    assert again.returncode == 0, again.stderr
    record = json.loads(again.stdout)[0]["record"]
    assert record["runs"] == len(record["evals"]) - measured  # what was measured before is not measured again


@pytest.mark.slow
def test_two_rungs_share_their_per_type_files_and_make_nothing_twice(tmp_path, toolchain):
    """Q4_K_M searched, then Q2_K: the Q2_K search adds parts with only the tensors the Q4_K_M one did not need at a
    type, touches none made before, and the files on disk are what `recipe --plan` said they would be."""
    quants = [{"type": q, "imatrix": "auto", "recipe": "search", "budget": "stock"} for q in ("Q4_K_M", "Q2_K")]
    config = pipeline_file(tmp_path, quants=quants, recipe=SMALL)
    planned = json.loads(run_moeq("recipe", "--config", str(config), "--plan", "--json").stdout)
    assert [p["plan"]["shared_with"] for p in planned] == [["Q2_K"], ["Q4_K_M"]]
    assert planned[0]["plan"]["pure_bytes"] == planned[1]["plan"]["pure_bytes"] < sum(
        p["plan"]["pure_bytes_alone"] for p in planned)
    assert run_moeq("recipe", "--config", str(config), "--quant", "Q4_K_M").returncode == 0
    pure = next((tmp_path / "work" / "recipe" / "pure").iterdir())
    made = {p.name: p.stat().st_mtime_ns for p in pure.glob("*.gguf")}
    assert run_moeq("recipe", "--config", str(config), "--quant", "Q2_K").returncode == 0
    assert all((pure / name).stat().st_mtime_ns == when for name, when in made.items())
    parts = json.loads((pure / "made.json").read_text())["parts"]
    assert any(p["file"] not in made for p in parts)  # Q2_K needed tensors at some type Q4_K_M did not
    for ggml_type in {p["type"] for p in parts}:
        held = [name for p in parts if p["type"] == ggml_type for name in p["tensors"]]
        assert len(held) == len(set(held)), ggml_type  # each tensor made once at each type
    disk = sum((pure / p["file"]).stat().st_size for p in parts)
    assert disk == pytest.approx(planned[0]["plan"]["pure_bytes"], rel=0.05)


def test_a_plan_runs_nothing(tmp_path, toolchain):
    quants = [{"type": "Q2_K", "imatrix": "auto", "recipe": "search"}]
    config = pipeline_file(tmp_path, quants=quants, recipe=SMALL)
    proc = run_moeq("recipe", "--config", str(config), "--plan", "--json")
    assert proc.returncode == 0, proc.stderr
    [planned] = json.loads(proc.stdout)
    assert planned["plan"]["groups"] == 16 and planned["plan"]["runs"] == SMALL["max_evals"]
    assert planned["plan"]["tokens_per_run"] == SMALL["ctx"] * SMALL["chunks"]
    assert not (tmp_path / "work" / "recipe").exists() and not list((tmp_path / "work" / "quants").iterdir())


@pytest.mark.slow
def test_a_budget_no_recipe_can_meet_is_refused_before_measuring(tmp_path, toolchain):
    quants = [{"type": "Q2_K", "imatrix": "auto", "recipe": "search", "budget": {"bytes": "100KB"}}]
    config = pipeline_file(tmp_path, quants=quants, recipe=SMALL)
    proc = run_moeq("recipe", "--config", str(config))
    assert proc.returncode == 3
    line = error_line(proc)
    assert line.startswith("error: quants[Q2_K].budget: 100,000 bytes, less than any recipe the search makes can "
                           "weigh (every tensor one type below the stock Q2_K: ") and line.endswith(
        "bytes); raise the budget or search a lower rung")
    assert not list((tmp_path / "work" / "recipe" / "Q2_K" / "evals").glob("*.json"))


@pytest.mark.parametrize("quant,recipe,message", [
    ({"type": "Q2_K", "recipe": "best"}, None, "quants[0].recipe: {folder}/best: no such recipe file; give recipe: "
                                               "search, or the path of a --tensor-type-file"),
    ({"type": "Q2_K", "budget": "stock"}, None, "quants[0].budget: a budget is for a searched recipe; add recipe: "
                                                "search"),
    ({"type": "Q2_K", "recipe": "search", "budget": {"bpw": 0.5}}, None,
     "quants[0].budget.bpw: bits per weight from 1 to 16, got 0.5"),
    ({"type": "Q2_K", "recipe": "search", "budget": {"bytes": "lots"}}, None,
     "quants[0].budget.bytes: 'lots' is not a size; write it like 24GB or 1.5GiB"),
    ({"type": "Q2_K", "recipe": "search", "tensor_types": {"attn_v": "q8_0"}}, None,
     "quants[0].tensor_types: a searched recipe types every tensor itself; remove tensor_types from Q2_K, or the "
     "recipe"),
    ({"type": "Q2_K", "recipe": "search"}, {"chunks": 1}, "recipe.chunks: must be at least 2, got 1"),
    ({"type": "Q2_K", "recipe": "search", "budget": {"gpu": "12GiB"}}, None,
     "quants[0].budget: a GPU budget needs a placement (none given); give placement: cpu-moe or gpu"),
    ({"type": "Q2_K", "recipe": "search", "budget": {"gpu": "12GiB", "placement": "somewhere"}}, None,
     "quants[0].budget.placement: a GPU budget needs a placement (got 'somewhere'); give placement: cpu-moe or gpu"),
    ({"type": "Q2_K", "recipe": "search", "budget": {"bpw": 3, "ctx": 4096}}, None,
     "quants[0].budget.ctx: placement and ctx are for a GPU budget; give gpu: SIZE, or leave them out"),
    ({"type": "Q2_K", "recipe": "search", "budget": {"gpu": "12GiB", "bytes": "1GB"}}, None,
     "quants[0].budget: 2 kinds of budget; give one of bpw, bytes or gpu"),
    ({"type": "Q2_K", "recipe": "search", "budget": {"gpu": "12GiB", "placement": "cpu-moe", "ctx": 0}}, None,
     "quants[0].budget.ctx: "),
    ({"type": "Q2_K", "recipe": "search"}, {"selection": "nowhere.txt"}, "recipe.selection: {folder}/nowhere.txt "
                                                                          "does not exist; fix the path"),
])
def test_recipe_settings_are_checked(tmp_path, quant, recipe, message):
    config = pipeline_file(tmp_path, quants=[quant], **({"recipe": recipe} if recipe else {}))
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2, proc.stdout
    assert message.format(folder=tmp_path) in error_line(proc)


def test_a_search_without_quality_figures_is_refused_at_load(tmp_path):
    """A searched rung where bench.quality is off was skipped at run time, the reason only in --json."""
    quants = [{"type": "Q8_0"}, {"type": "Q2_K", "recipe": "search"}]
    config = pipeline_file(tmp_path, trained=False, quants=quants, bench={"quality": False})
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith(f"error: {config}:") and line.endswith(
        ": bench.quality: false, while Q2_K has recipe: search, which measures every recipe's KL divergence (without it "
        "the search would be skipped); set bench.quality: true, or remove recipe: search"), line


def test_check_config_names_the_file_a_searched_rung_may_publish(tmp_path):
    quants = [{"type": "Q8_0"}, {"type": "Q2_K", "imatrix": "auto", "recipe": "search"}]
    proc = run_moeq("check-config", "--config", str(pipeline_file(tmp_path, quants=quants)), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["quant"]: row for row in json.loads(proc.stdout)["quants"]}
    assert rows["Q2_K"]["searched_file"] == "tiny-phimoe-Q2_K_MOEQ.gguf" and rows["Q8_0"]["searched_file"] is None
    shown = run_moeq("check-config", "--config", str(tmp_path / "tiny-phimoe.yaml"))
    assert "or, when the search wins:" in shown.stdout and "tiny-phimoe-Q2_K_MOEQ.gguf" in shown.stdout.replace("\n", "")


@pytest.mark.parametrize("layers", [2, 16])
def test_the_doctors_expert_mixture_is_llama_quantizes(tmp_path, toolchain, layers):
    """doctor estimates the per-type files from llama.cpp's types for the expert tensors of each searchable rung:
    llama-quantize --dry-run gives each expert tensor of a tiny model (2 and 16 layers: layer 0 is in the first
    sixteenth, some layers use more bits) exactly those types."""
    from moeq.doctor import GATE_UP_TYPES, ffn_down_type
    from moeq.quant_types import mixture
    from moeq.synth import SynthSpec, write_synth_model

    model = write_synth_model(tmp_path / "tiny-F16.gguf", SynthSpec(layers=layers))
    for rung, gate_up in GATE_UP_TYPES.items():
        mix = mixture(toolchain.path("llama-quantize"), model, rung).types
        assert {t for n, t in mix.items() if "ffn_gate_exps" in n or "ffn_up_exps" in n} == {gate_up}, rung
        assert [mix[f"blk.{i}.ffn_down_exps.weight"] for i in range(layers)] == \
            [ffn_down_type(rung, i, layers) for i in range(layers)], rung


def test_a_selection_text_that_shares_lines_with_the_evaluation_text_is_refused(tmp_path, toolchain):
    borrowed = tmp_path / "borrowed.txt"
    borrowed.write_text(shipped_selection().read_text() + shipped_evaluation().read_text()[:4000])
    quants = [{"type": "Q2_K", "recipe": "search"}]
    config = pipeline_file(tmp_path, trained=False, quants=quants, recipe={**SMALL, "selection": str(borrowed)})
    proc = run_moeq("recipe", "--config", str(config))
    assert proc.returncode == 3
    line = error_line(proc)
    assert line.startswith(f"error: {borrowed}: shares ") and f"with {shipped_evaluation()} (bench.perplexity.text)" in line
    assert line.endswith("(recipe.selection)")
    assert not (tmp_path / "work" / "recipe" / "pure").exists()  # refused before any per-type file is made


def test_a_selection_text_too_short_for_two_chunks_is_refused(tmp_path, toolchain):
    short = tmp_path / "short.txt"
    short.write_text("A few words of selection text.\n" * 10)
    quants = [{"type": "Q2_K", "recipe": "search"}]
    config = pipeline_file(tmp_path, quants=quants, recipe={**SMALL, "selection": str(short)})
    proc = run_moeq("recipe", "--config", str(config))
    assert proc.returncode == 3
    assert error_line(proc) == (f"error: {short}: too short for two chunks of 128 tokens (recipe.selection); use a "
                                "longer text or a smaller recipe.ctx")


@pytest.mark.slow
def test_a_full_disk_while_the_per_type_files_are_written_leaves_whole_files_and_the_search_goes_on(tmp_path,
                                                                                                    toolchain):
    """Writes past a size limit fail while the --pure files are made: one error line, no partial file, no file
    under a final name that is not whole; the next run keeps the files made and makes the rest."""
    quants = [{"type": "Q4_K_M", "imatrix": "auto", "recipe": "search", "budget": "stock"}]
    config = pipeline_file(tmp_path, trained=False, quants=quants, recipe=SMALL)
    assert run_moeq("fetch", "--config", str(config)).returncode == 0

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # llama-quantize writes each per-type file whole before moeq keeps what the search needs of it: the stock
        # Q4_K_M (2.25 MiB), the IQ4_XS and Q4_K ones (1.76 and 1.85 MiB) fit under 2.375 MiB, the Q5_K one (2.53 MiB,
        # every expert tensor at Q5_K) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (19 << 17, 19 << 17))

    proc = subprocess.run([sys.executable, "-m", "moeq", "recipe", "--config", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, preexec_fn=limited, timeout=600)
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: llama-quantize: killed by signal") and "Q5_K.log" in line, line
    pure = next((tmp_path / "work" / "recipe" / "pure").iterdir())
    assert not list((tmp_path / "work").rglob("*.partial"))
    made = json.loads((pure / "made.json").read_text())["parts"]
    assert [p["type"] for p in made] == sorted(p.stem for p in pure.glob("*.gguf")) == ["IQ4_XS", "Q4_K"]
    kept = {p.name: p.stat().st_mtime_ns for p in pure.glob("*.gguf")}
    again = run_moeq("recipe", "--config", str(config), "--json")
    assert again.returncode == 0, again.stderr
    assert all(pure.joinpath(name).stat().st_mtime_ns == when for name, when in kept.items())  # not made again
    assert {p.name for p in pure.glob("*.gguf")} == {f"{t}.gguf" for t in ("IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")}


def test_the_next_build_uses_the_search_run_by_hand_and_says_why_a_stage_is_skipped(searched):
    """Last in this file: the build's choice deletes the searched file the search assembled (llama-quantize makes it
    again from the recipe file), which the tests above read."""
    config, record = searched
    quick = run_moeq("build", "--config", str(config), "--quant", "Q2_K", "--skip-bench")
    assert quick.returncode == 0, quick.stderr
    assert ("recipe skipped for Q2_K: --skip-bench; the stock file is made with the importance matrix"
            in quick.stdout.replace("\n", " "))
    proc = run_moeq("build", "--config", str(config), "--quant", "Q2_K", "--json")
    assert proc.returncode == 0, proc.stderr
    [built] = json.loads(proc.stdout)["quants"]
    stages = {s["stage"]: s for s in built["stages"]}
    assert stages["recipe"]["status"] == "up to date"
    choice = json.loads((config.parent / "work" / "records" / "choice-Q2_K.json").read_text())["record"]
    searched_row = next(c for c in choice["candidates"] if c["name"] == "with the searched recipe")
    assert searched_row["file"]["sha256"] == record["output"]["sha256"]  # the file the search chose, measured

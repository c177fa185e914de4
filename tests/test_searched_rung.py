"""A searched rung published: `moeq build --push` of the trained example with `recipe: search` on Q2_K. The searched
file is the choice's third candidate; where it beats the stock Q2_K on the evaluation text by more than twice the
combined uncertainty at no larger size, it is published as Q2_K_MOEQ with its recipe file, and read back by the
clients users run (llama.cpp's `-hf REPO:LABEL`, the Hub's JavaScript), rebuilt from the published recipe, and
validated against the recipe instead of llama.cpp's mixture."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from moeq.gguf_header import read_header
from moeq.kld import compare
from moeq.manifest import parse_manifest
from moeq.recipe_file import read_recipe
from moeq.cards.facts.shared import slower_tests
from moeq.records import Made, Candidate, FileRef, PerplexityFigures, SpeedRun
from moeq.choice.stage import choose
from moeq.validate.checks import check_type_mix
from moeq.runner import tool_env

from conftest import HUB_TOKEN, HUB_USER, example_section, pipeline_file, rebuild_from_card, run_moeq
import hub_server

CPU_ONLY = {**{k: v for k, v in example_section("bench").items() if k != "rpc"}, "modes": ["cpu"], "repetitions": 1}
SEARCH = {"ctx": 256, "chunks": 16, "max_evals": 25}  # about 25 llama-perplexity runs of 4,096 tokens
REPO_ID = f"{HUB_USER}/tiny-phimoe-GGUF"
LABEL = "Q2_K_MOEQ"
FILE = "tiny-phimoe-Q2_K_MOEQ.gguf"
STOCK_FILE = "tiny-phimoe-Q2_K.gguf"


def candidate(name, kld, err, size) -> Candidate:
    return Candidate(name=name, imatrix=None, file=FileRef(path="q.gguf", size=size, sha256="0" * 64),
                     quality=PerplexityFigures(command=["llama-perplexity"], kld_mean=kld, kld_mean_err=err))


@pytest.mark.parametrize("searched,chosen,why", [
    ((0.044768, 0.000862, 1_430_000), 2, "the file made with the searched recipe has the lower"),
    ((0.057700, 0.001506, 1_430_000), 0, "differs by no more than twice"),  # lower, within 2 sigma: the stock stays
    ((0.030000, 0.000500, 1_500_000), 0, "is larger than the stock file (1,500,000 bytes against 1,480,000)"),
])
def test_a_searched_file_is_published_only_when_better_beyond_the_uncertainty_at_no_larger_size(searched, chosen, why):
    stock = candidate(Made.WITH, 0.060273, 0.001633, 1_480_000)
    without = candidate(Made.WITHOUT, 0.060000, 0.001600, 1_480_000)
    index, reason = choose([stock, without, candidate(Made.SEARCHED, *searched)], may_choose=True)
    assert index == chosen and why in reason


def speed(pp: tuple[float, float], tg: tuple[float, float]) -> SpeedRun:
    tests = [{"test": test, "n_prompt": 64 if test == "pp64" else 0, "n_gen": 16 if test == "tg16" else 0,
              "avg_ts": avg, "stddev_ts": std, "samples_ts": [avg] * 3, "n_threads": 2, "n_cpu_moe": 0,
              "n_gpu_layers": 0} for test, (avg, std) in (("pp64", pp), ("tg16", tg))]
    return SpeedRun(mode="cpu", command=["llama-bench"], backends="CPU", gpu_info=None, cpu_info=None, model_size=None,
                    model_n_params=None, build_commit=None, tests=tests)


def test_the_card_says_a_recipe_is_slower_only_beyond_the_spread():
    stock = speed((1000, 20), (300, 5))
    assert slower_tests(speed((990, 20), (280, 5)), stock) == ["tg16"]  # 20 apart, against 2 x 7.1
    assert slower_tests(speed((900, 30), (295, 5)), stock) == ["pp64"]
    assert slower_tests(speed((1100, 30), (310, 5)), stock) == []  # faster is not slower


@pytest.fixture(scope="module")
def published(tmp_path_factory, toolchain):
    """The trained example's Q2_K pushed to a test Hub as llama.cpp makes it, then again with a searched recipe,
    built, measured and pushed to the same repo (a re-release that publishes Q2_K_MOEQ where Q2_K was)."""
    folder = tmp_path_factory.mktemp("searched")
    server = hub_server.TestHub({HUB_TOKEN: HUB_USER})
    server.env = {"HF_ENDPOINT": server.url, "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_XET": "1",
                  "HF_HOME": str(folder / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    stock = pipeline_file(folder, bench=CPU_ONLY, quants=[{"type": "Q2_K", "imatrix": "auto"}], recipe=SEARCH)
    proc = run_moeq("build", "--config", str(stock), "--all", "--push", env=server.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert STOCK_FILE in server.state.files(REPO_ID)
    quants = [{"type": "Q2_K", "imatrix": "auto", "recipe": "search", "budget": "stock"}]
    config = pipeline_file(folder, bench=CPU_ONLY, quants=quants, recipe=SEARCH)
    proc = run_moeq("build", "--config", str(config), "--all", "--push", "--json", env=server.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield config, server, json.loads(proc.stdout)
    server.close()


def records(config: Path, name: str) -> dict:
    return json.loads((config.parent / "work" / "records" / f"{name}.json").read_text())["record"]


def test_the_searched_file_is_published_when_it_measures_better(published):
    config, _server, summary = published
    stages = {s["stage"]: s["status"] for s in summary["quants"][0]["stages"]}
    assert stages["recipe"] == "ran" and stages["choice"] == "ran" and stages["push"] == "ran"
    choice = records(config, "choice-Q2_K")
    assert [c["name"] for c in choice["candidates"]] == [Made.WITH, Made.WITHOUT, Made.SEARCHED]
    stock, searched = choice["candidates"][0], choice["candidates"][2]
    verdict = compare(PerplexityFigures(**searched["quality"]), PerplexityFigures(**stock["quality"]))
    # The trained example's searched Q2_K beats the stock one well beyond 2 sigma (0.045 against 0.060); a run whose
    # figures say otherwise must not publish it.
    assert verdict == "lower" and searched["file"]["size"] <= stock["file"]["size"], choice["why"]
    assert choice["chosen"] == 2
    quantized = records(config, "quantize-Q2_K")
    work = config.parent / "work"
    assert Path(quantized["output"]["path"]).name == FILE and (work / "quants" / FILE).is_file()
    assert not (work / "quants" / "tiny-phimoe-Q2_K.gguf").exists()
    assert quantized["output"]["sha256"] == searched["file"]["sha256"]
    assert quantized["options"]["pure"] is True and quantized["options"]["tensor_type_file"]
    recipe = records(config, "recipe-Q2_K")
    assert recipe["output"]["sha256"] == searched["file"]["sha256"]  # llama-quantize's file is the assembled one
    assert not list((work / "choice").rglob("*.gguf")) and not list((work / "recipe" / "Q2_K").glob("*.gguf"))


def test_the_card_shows_the_recipe_and_every_candidate(published):
    config, server, _summary = published
    files = server.state.files(REPO_ID)
    assert FILE in files and "tiny-phimoe-Q2_K_MOEQ.recipe" in files  # the stock file stays: see the last test
    card = files["README.md"].decode()
    recipe = records(config, "recipe-Q2_K")
    recipe_sha = hashlib.sha256(files["tiny-phimoe-Q2_K_MOEQ.recipe"]).hexdigest()
    assert recipe_sha == recipe["recipe_file"]["sha256"]
    assert "| [tiny-phimoe-Q2_K_MOEQ.recipe](" in card and f"`{recipe_sha}`" in card
    assert f"llama-server -hf {REPO_ID}:{LABEL} " in card
    assert "**moeq's searched recipe beat the stock Q2_K on this model**" in card
    assert "| Figure | This file (with the searched recipe) | Q2_K with the importance matrix | Q2_K without" in card
    assert " ".join(recipe["command"]) in card  # the rebuild command, as the record keeps it
    chosen = recipe["evals"][recipe["chosen"]]
    assert f"| Tensor bytes | {recipe['evals'][0]['tensor_bytes']:,} | {chosen['tensor_bytes']:,} |" in card
    for tensor, ggml_type in chosen["changes"].items():
        group = next(g["name"] for g in recipe["groups"] if tensor in g["tensors"])
        assert f"| `{group}` | {recipe['stock_types'][tensor]} | {ggml_type} |" in card
    # The searched file's speed beside the stock file's, from the choice's llama-bench runs (three repetitions).
    choice = records(config, "choice-Q2_K")
    timed = [c for c in choice["candidates"] if c["speed"]]
    assert [c["name"] for c in timed] == [Made.WITH, Made.SEARCHED]
    assert all(t["n_gen"] or t["n_prompt"] for c in timed for t in c["speed"]["tests"])
    assert all(len(t["samples_ts"]) == 3 for c in timed for t in c["speed"]["tests"])
    assert "| Tokens/s on the CPU (llama-bench) | pp64 " in card
    assert "Speed on the CPU (llama-bench, tokens/s): the recipe pp64 " in card
    manifest = parse_manifest(files["moeq-manifest.json"].decode(), "moeq-manifest.json")
    [entry] = manifest.quants
    assert entry.recipe_file.name == "tiny-phimoe-Q2_K_MOEQ.recipe" and entry.records.recipe is not None
    assert run_moeq("card", "verify", str(config.parent / "work" / "repos" / "ladder" / "README.md")).returncode == 0


def test_llama_cpp_downloads_the_searched_file_by_its_label(published, tmp_path, toolchain):
    _config, server, _summary = published
    env = {**os.environ, **tool_env(toolchain.path("llama-completion")), "MODEL_ENDPOINT": server.url + "/",
           "LLAMA_CACHE": str(tmp_path / "llama-cache")}
    env.pop("HF_TOKEN", None)

    def run(ref: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(toolchain.path("llama-completion")), "-hf", ref, "-p", "The", "-n", "8", "--temp",
                               "0", "-no-cnv", "--no-warmup", "-t", "2"], env=env, capture_output=True, text=True,
                              errors="replace", timeout=300)

    start = len(server.requests)
    proc = run(f"{REPO_ID}:{LABEL}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("The") and len(proc.stdout.strip()) > len("The")
    resolved = {r.path.rsplit("/", 1)[1] for r in server.requests[start:] if "/resolve/" in r.path}
    assert resolved == {FILE}  # exactly the searched file: not the recipe, not the importance matrix
    [got] = [p for p in (tmp_path / "llama-cache").rglob(FILE) if p.is_file()]
    assert got.read_bytes() == server.state.files(REPO_ID)[FILE]
    # The stock type's name still picks the stock file the first release published (kept, superseded), never the
    # searched one: what was scripted against REPO:Q2_K goes on working.
    start = len(server.requests)
    proc = run(f"{REPO_ID}:Q2_K")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r.path.rsplit("/", 1)[1] for r in server.requests[start:] if "/resolve/" in r.path} == {STOCK_FILE}


def test_the_hubs_javascript_labels_the_searched_file(published):
    from test_hub_clients import node_clients

    _config, server, _summary = published
    names = sorted(server.state.files(REPO_ID))
    found = node_clients(names, {FILE: f"{server.url}/{REPO_ID}/resolve/main/{FILE}"})
    assert found["labels"][FILE]["label"] == LABEL
    assert found["headers"][FILE]["file_type"] == 10  # general.file_type is the base type's, Q2_K
    assert found["labels"]["tiny-phimoe-Q2_K_MOEQ.recipe"]["label"] == LABEL  # named for the file it rebuilds
    assert all(found["labels"][n]["label"] is None for n in names if n.endswith((".imatrix", ".json", ".md", ".png")))


def test_the_published_recipe_rebuilds_the_published_file(published, tmp_path, toolchain):
    """The card's rebuild command, run on the F16 source with the importance matrix and recipe file from the Hub."""
    config, server, _summary = published
    files = server.state.files(REPO_ID)
    source = config.parent / "work" / "source" / "tiny-phimoe-F16.gguf"
    made = rebuild_from_card(files, FILE, source, tmp_path, toolchain.path("llama-quantize"))
    assert hashlib.sha256(made).hexdigest() == hashlib.sha256(files[FILE]).hexdigest()


def test_validate_checks_each_tensor_against_the_recipe(published):
    config, _server, _summary = published
    work = config.parent / "work"
    quantized = records(config, "quantize-Q2_K")
    header = read_header(work / "quants" / FILE)
    recipe = dict(read_recipe(work / quantized["options"]["tensor_type_file"]["path"]))
    ends = {"output.weight": quantized["options"]["output_tensor_type"],
            "token_embd.weight": quantized["options"]["token_embedding_type"]}
    assert check_type_mix(header, "Q2_K", recipe, ends, pure=True).ok
    # llama.cpp's stock Q2_K mixture is not what this file holds: checked against it, it fails.
    assert not check_type_mix(header, "Q2_K").ok
    # A recipe that says otherwise for one tensor fails, naming it.
    pattern, ggml_type = next(iter(recipe.items()))
    wrong = {**recipe, pattern: "Q8_0" if ggml_type != "Q8_0" else "Q6_K"}
    result = check_type_mix(header, "Q2_K", wrong, ends, pure=True)
    name = pattern.strip("^$").replace("\\", "")
    assert not result.ok and name in result.detail, result.detail
    validated = records(config, "validate-Q2_K")
    assert validated["ok"] and [c["ok"] for c in validated["checks"] if c["name"] == "type mix"] == [True]


def test_a_re_release_keeps_the_file_it_replaces_and_says_what_changed(published, tmp_path):
    """Q2_K_MOEQ published where Q2_K was: the old file stays (`-hf REPO:Q2_K` keeps working), the card marks it
    superseded, its "Updates" section and the commit message say what changed; `push --prune` deletes it (last in
    this module: it changes the repo the tests above read)."""
    config, server, _summary = published
    files = server.state.files(REPO_ID)
    assert STOCK_FILE in files and FILE in files
    card = files["README.md"].decode()
    row = next(line for line in card.splitlines() if line.startswith(f"| [{STOCK_FILE}]"))
    assert "**superseded** by Q2_K_MOEQ" in row
    updates = card.split("\n## Updates\n")[1].split("\n## ")[0]
    first, stock_commit = server.state.commits_on(REPO_ID)[:2]
    assert f"Since [{stock_commit.oid[:12]}]" in updates
    replaced = f"Q2_K: {FILE} replaces {STOCK_FILE}, which stays as it was (superseded)"
    assert replaced in updates and replaced in first.description
    assert first.description.startswith(f"Changes since {stock_commit.oid[:12]}:")
    assert "Q2_K mean KLD: " in updates and "Q2_K size: " in updates
    manifest = parse_manifest(files["moeq-manifest.json"].decode(), "manifest")
    assert [(s.name, s.label, s.replaced_by) for s in manifest.superseded] == [(STOCK_FILE, "Q2_K", LABEL)]
    assert manifest.superseded[0].sha256 == hashlib.sha256(files[STOCK_FILE]).hexdigest()
    for name in ("README.md", "moeq-manifest.json"):  # the card on the Hub verifies against the manifest there
        (tmp_path / name).write_bytes(files[name])
    proc = run_moeq("card", "verify", str(tmp_path / "README.md"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commits = len(server.state.commits_on(REPO_ID))
    proc = run_moeq("push", "--config", str(config), env=server.env)  # again, nothing changed: no commit
    assert proc.returncode == 0 and len(server.state.commits_on(REPO_ID)) == commits, proc.stdout + proc.stderr
    assert server.state.files(REPO_ID)["README.md"].decode() == card
    proc = run_moeq("push", "--config", str(config), "--prune", env=server.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = server.state.files(REPO_ID)
    assert STOCK_FILE not in files and FILE in files
    card = files["README.md"].decode()
    assert "superseded** by" not in card and f"deleted {STOCK_FILE}, superseded before (push --prune)" in card
    assert replaced in card  # the earlier release's note stays

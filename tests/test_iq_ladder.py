"""The importance-matrix (IQ) rungs: refused at load where llama-quantize would refuse them, built where it can make
them, validated against llama.cpp's own mixture for their type (llama-quantize --dry-run), measured, charted and
read back by the clients users run; the wide example, the trained model's whole ladder in one repo; and a searched
IQ rung, typed along the ladder of K and IQ types, published by the choice's rule and rebuilt from its card."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from moeq import quant_types
from moeq.gguf_header import read_header
from moeq.choice.stage import choose
from moeq.manifest import parse_manifest
from moeq.records import Candidate, Made, QuantizeRecord
from moeq.runner import tool_env

from conftest import HUB_TOKEN, HUB_USER, REPO, pipeline_file, rebuild_from_card, run_moeq
import hub_server
from test_hub_clients import node_clients

WIDE = REPO / "examples" / "tiny-phimoe-wide.yaml"
WIDE_REPO = "moeq-test/tiny-phimoe-wide-GGUF"


@pytest.mark.parametrize("quant,where,message", [
    ({"type": "IQ2_XXS"}, "quants[0].type",
     "IQ2_XXS is made only with an importance matrix (llama-quantize refuses it without one); give IQ2_XXS "
     "imatrix: auto, or the path of a matrix"),
    ({"type": "IQ1_M", "imatrix": "none"}, "quants[0].imatrix", "IQ1_M is made only with an importance matrix"),
    ({"type": "Q1_0"}, "quants[0].type", "moeq cannot validate a Q1_0 file: the gguf package moeq reads files with "
     "(gguf-py "),
    ({"type": "Q2_0"}, "quants[0].type", "does not know Q2_0 tensors; leave Q2_0 out of the ladder"),
    ({"type": "IQ4_NL", "imatrix": "auto", "recipe": "search"}, "quants[0].recipe",
     "a searched recipe moves tensors along IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, Q2_K, IQ3_XXS, IQ3_S, Q3_K, IQ4_XS, "
     "Q4_K, Q5_K, Q6_K, Q8_0; IQ4_NL's tensors are IQ4_NL, which is not among them; remove recipe: search from "
     "IQ4_NL"),
    ({"type": "MXFP4_MOE", "recipe": "search"}, "quants[0].recipe", "MXFP4_MOE's tensors are MXFP4, which is not"),
])
def test_check_config_refuses_what_llama_quantize_or_the_search_cannot_make(tmp_path, quant, where, message):
    config = pipeline_file(tmp_path, trained=False, quants=[quant])
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{config}:" in proc.stderr and f": {where}: " in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "work").exists()  # nothing ran


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """examples/tiny-phimoe-wide.yaml built from a fresh workspace and pushed to a test Hub."""
    folder = tmp_path_factory.mktemp("wide")
    config = folder / WIDE.name
    shutil.copy(WIDE, config)
    server = hub_server.TestHub({HUB_TOKEN: HUB_USER})
    server.env = {"HF_ENDPOINT": server.url, "HF_TOKEN": HUB_TOKEN, "HF_HUB_DISABLE_XET": "1", "COLUMNS": "80",
                  "HF_HOME": str(folder / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = run_moeq("build", "--config", str(config), "--all", "--push", env=server.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield config, server, proc
    server.close()


@pytest.mark.slow
def test_the_wide_ladder_builds_validates_against_llama_cpps_mixture_and_runs(wide, toolchain, monkeypatch):
    config, server, proc = wide
    monkeypatch.chdir(config.parent / "work-wide")  # the records' paths are the workspace's
    ladder = [q["type"] for q in yaml.safe_load(WIDE.read_text())["quants"]]
    assert len(ladder) == 11
    tables = [line for line in proc.stdout.splitlines() if line[:1] in "┏┃┡│└"]  # the summary, in parts
    assert len(tables) > 40 and not [line for line in tables if "…" in line or len(line) > 80]
    files = server.state.files(WIDE_REPO)
    manifest = parse_manifest(files["moeq-manifest.json"].decode(), "manifest")
    assert [e.quant for e in manifest.quants] == ladder
    matrix = config.parent / "work-wide" / "imatrix" / "tiny-phimoe.imatrix"
    source = config.parent / "work-wide" / "source" / "tiny-phimoe-F16.gguf"
    for entry in manifest.quants:
        quantize, validated, bench = entry.records.quantize, entry.records.validate_, entry.records.bench
        assert validated.ok and bench is not None and bench.speed, entry.quant  # measured: it ran in llama.cpp
        assert bench.quality.quant.kld_mean > 0
        # every tensor has the type llama.cpp gives it for this type with this importance matrix: its own mixture,
        # or with a searched recipe published, the recipe's (llama-quantize --dry-run with the same flags)
        options = QuantizeRecord.model_validate(record(config, f"quantize-{entry.quant}")).options  # the workspace's
        before, after = options.type_flags()
        flags = [*before, *(["--imatrix", str(matrix)] if options.imatrix else []), *after]
        mix = quant_types.mixture(toolchain.path("llama-quantize"), source, entry.quant, flags).types
        header = read_header(config.parent / "work-wide" / "quants" / entry.files[0].name)
        assert {t.name: t.type.name for t in header.tensors if t.name in mix} == mix, entry.quant
        if entry.quant in quant_types.REQUIRES_IMATRIX:
            # no candidate without the matrix: made with it, no choice
            assert entry.records.choice is None and quantize.options.imatrix is not None, entry.quant
    assert manifest.entry("IQ4_XS").records.choice.candidates[1].name == "without the importance matrix"
    readme = files["README.md"].decode()
    quality_alt = re.search(r"!\[([^\]]*)\]\([^)]*quality-size\.png\)", readme).group(1)
    assert all(q in quality_alt for q in ladder)  # the chart shows the whole ladder
    (config.parent / "hub-card").mkdir()
    for name in ("README.md", "moeq-manifest.json"):
        (config.parent / "hub-card" / name).write_bytes(files[name])
    for check in ("lint", "verify"):
        done = run_moeq("card", check, str(config.parent / "hub-card" / "README.md"))
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_llama_cpp_and_the_hubs_javascript_pick_exactly_the_iq_file(wide, tmp_path, toolchain):
    _config, server, _proc = wide
    tool = toolchain.path("llama-completion")
    env = {**os.environ, **tool_env(tool), "MODEL_ENDPOINT": server.url + "/", "LLAMA_CACHE": str(tmp_path / "c")}
    env.pop("HF_TOKEN", None)
    for label in ("IQ4_XS", "IQ3_XXS", "IQ2_XXS"):
        start = len(server.requests)
        proc = subprocess.run([str(tool), "-hf", f"{WIDE_REPO}:{label}", "-p", "The", "-n", "4", "--temp", "0",
                               "-no-cnv", "--no-warmup", "-t", "2"], env=env, capture_output=True, text=True,
                              errors="replace", timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        resolved = {r.path.rsplit("/", 1)[1] for r in server.requests[start:] if "/resolve/" in r.path}
        assert resolved == {f"tiny-phimoe-{label}.gguf"}, (label, resolved)
    names = sorted(server.state.files(WIDE_REPO))
    found = node_clients(names, {n: f"{server.url}/{WIDE_REPO}/resolve/main/{n}" for n in names if n.endswith(".gguf")})
    labels = {n: found["labels"][n]["label"] for n in names if n.endswith(".gguf")}
    manifest = parse_manifest(server.state.files(WIDE_REPO)["moeq-manifest.json"].decode(), "manifest")
    assert labels == {e.files[0].name: e.label for e in manifest.quants}  # TYPE, or TYPE_MOEQ for a searched file
    assert {e.label for e in manifest.quants} >= {"IQ4_XS", "IQ2_XXS", "IQ3_M_MOEQ"}


@pytest.mark.slow
def test_every_type_llama_quantize_offers_builds_and_validates_or_is_refused_at_load(tmp_path):
    """Each type of the pinned llama-quantize's list (the quant-type table is checked against it) that check-config
    accepts is made from the tiny model, with the importance matrix where it may have one, and passes validate:
    its mixture as llama-quantize's own --dry-run gives it, and the numerics bounds of its tensor types."""
    offered = list(quant_types.BASE_TENSOR_TYPE)
    refused = [t for t in offered if quant_types.unreadable(t)]
    assert refused == ["Q1_0", "Q2_0"]
    quants = [{"type": t} if t == "Q8_0" else {"type": t, "imatrix": "auto"} for t in offered if t not in refused
              and t not in ("Q3_K", "Q4_K", "Q5_K")]  # the same file types as Q3_K_M, Q4_K_M, Q5_K_M
    config = pipeline_file(tmp_path, trained=False, quants=quants)
    proc = run_moeq("build", "--config", str(config), "--all", "--skip-bench")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for q in quants:
        record = yaml.safe_load((tmp_path / "work" / "records" / f"validate-{q['type']}.json").read_text())["record"]
        assert record["ok"] and [c["name"] for c in record["checks"]][3] == "type mix", q
        assert all(w["bound"] is not None for w in record["worst_tensors"]), q  # every tensor type has a bound


IQ_FILE = "tiny-phimoe-IQ3_M_MOEQ.gguf"


def record(config, name: str) -> dict:
    return json.loads((config.parent / "work-wide" / "records" / f"{name}.json").read_text())["record"]


@pytest.mark.slow
def test_a_searched_iq_rung_types_k_and_iq_and_is_published_by_the_choices_rule(wide):
    config, server, _proc = wide
    recipe = record(config, "recipe-IQ3_M")
    # the stock IQ3_S, Q4_K and Q6_K tensors and the next type either side of each by bits per weight
    assert recipe["base_type"] == "IQ3_S"
    assert recipe["types"] == ["IQ3_XXS", "IQ3_S", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    moved = {(recipe["stock_types"][n], t) for e in recipe["evals"] for n, t in e["changes"].items()}
    assert ("IQ3_S", "IQ3_XXS") in moved and ("IQ3_S", "IQ4_XS") in moved  # the IQ tensors' neighbours are measured
    choice = record(config, "choice-IQ3_M")
    candidates = [Candidate(**c) for c in choice["candidates"]]
    assert [c.name for c in candidates] == [Made.WITH, Made.WITHOUT, Made.SEARCHED]
    # published exactly when the choice's rule says so: on this model the searched recipe is lower beyond twice the
    # combined uncertainty (0.0115 against 0.0148) at a smaller file
    assert choose(candidates, may_choose=True)[0] == choice["chosen"] == 2, choice["why"]
    assert IQ_FILE in server.state.files(WIDE_REPO) and "tiny-phimoe-IQ3_M.gguf" not in server.state.files(WIDE_REPO)
    assert read_header(config.parent / "work-wide" / "quants" / IQ_FILE).metadata["general.file_type"] == 27


@pytest.mark.slow
def test_the_searched_iq_file_rebuilds_from_its_cards_command_and_clients_pick_it(wide, tmp_path, toolchain):
    config, server, _proc = wide
    files = server.state.files(WIDE_REPO)
    source = config.parent / "work-wide" / "source" / "tiny-phimoe-F16.gguf"
    assert rebuild_from_card(files, IQ_FILE, source, tmp_path, toolchain.path("llama-quantize")) == files[IQ_FILE]
    tool = toolchain.path("llama-completion")
    env = {**os.environ, **tool_env(tool), "MODEL_ENDPOINT": server.url + "/", "LLAMA_CACHE": str(tmp_path / "c")}
    env.pop("HF_TOKEN", None)
    start = len(server.requests)
    proc = subprocess.run([str(tool), "-hf", f"{WIDE_REPO}:IQ3_M_MOEQ", "-p", "The", "-n", "4", "--temp", "0", "-no-cnv",
                           "--no-warmup", "-t", "2"], env=env, capture_output=True, text=True, errors="replace",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r.path.rsplit("/", 1)[1] for r in server.requests[start:] if "/resolve/" in r.path} == {IQ_FILE}
    found = node_clients(sorted(files), {IQ_FILE: f"{server.url}/{WIDE_REPO}/resolve/main/{IQ_FILE}"})
    assert found["labels"][IQ_FILE]["label"] == "IQ3_M_MOEQ" and found["headers"][IQ_FILE]["file_type"] == 27

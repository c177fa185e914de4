"""The one stage runner's skip rule, stage by stage: change one declared input and exactly that stage and
the stages whose inputs it changes run again; the rest are up to date. Real tools, one quant, the
RPC device standing in for a GPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import copy_built, pipeline_file, run_moeq

STAGES = ("fetch", "quantize", "validate", "bench", "shards", "card", "push")  # Q8_0's: it has no imatrix


def statuses(config: Path, *args: str, details: dict | None = None) -> dict[str, str]:
    """Each stage's status in `moeq build --json`; `details` gets why each stage that ran did."""
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--json", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [quant] = json.loads(proc.stdout)["quants"]
    if details is not None:
        details.update({s["stage"]: s["detail"] for s in quant["stages"] if s["status"] == "ran"})
    return {s["stage"]: s["status"] for s in quant["stages"]}


def ran(result: dict[str, str]) -> set[str]:
    return {stage for stage, status in result.items() if status == "ran"}


@pytest.fixture(scope="module")
def built_once(tmp_path_factory, toolchain, rpc_device) -> Path:
    # Random weights: the skip rule does not depend on them, and a new seed of the trained model would train again.
    config = pipeline_file(tmp_path_factory.mktemp("runner"), trained=False, rpc=rpc_device)
    assert ran(statuses(config)) == set(STAGES) - {"push"}
    assert ran(statuses(config)) == set()  # a second build with nothing changed does nothing
    return config.parent


@pytest.fixture
def built(tmp_path, built_once) -> Path:
    """A copy of the built folder for each test to change (a copy is current: each test's first build shows it)."""
    copy_built(built_once, tmp_path)
    return tmp_path / "tiny-phimoe.yaml"


def edit(config: Path, where: str, value) -> None:
    """Set one value of the pipeline file, named by its path (`bench.ctx`, `quants.0.tensor_types`)."""
    data = yaml.safe_load(config.read_text())
    *parents, last = [int(key) if key.isdigit() else key for key in where.split(".")]
    target = data
    for key in parents:
        target = target[key]
    target[last] = value
    config.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("change,expected", [
    # fetch: the synth options are the fetch stage's key; a new model changes every file after it
    (("source.synth.seed", 1), {"fetch", "quantize", "validate", "bench", "shards", "card"}),
    # quantize: an option that changes llama-quantize's output
    (("quants.0.tensor_types", {"attn_v": "q4_0"}), {"quantize", "validate", "bench", "shards", "card"}),
    # validate (the plan's contexts) and bench (its options) both key on bench.ctx
    (("bench.ctx", [256]), {"validate", "bench", "card"}),
    # bench alone
    (("bench.n_gen", 8), {"bench", "card"}),
    # shards: a shard size under the file's splits it
    (("hub.max_shard_size", "2MB"), {"shards", "card"}),
    # card: what it says, not what is measured
    (("card.extra.note", "one more line"), {"card"}),
], ids=["fetch", "quantize", "validate-and-bench", "bench", "shards", "card"])
def test_a_changed_input_reruns_its_stage_and_what_depends_on_it(built, change, expected):
    edit(built, *change)
    why: dict[str, str] = {}
    assert ran(statuses(built, details=why)) == expected
    assert all(detail.startswith("changed: ") for detail in why.values()), why  # each names the key that changed
    assert ran(statuses(built)) == set()


@pytest.mark.parametrize("stage,field,value,expected", [
    # the same bytes again, but a new file: the card stage links the staged repo to it
    ("quantize", "tool_commit", "another-build", {"quantize", "card"}),
    # new measurements: the card shows them
    ("bench", "machine", {"cpu": "another CPU", "cores": 1, "ram_bytes": 1, "gpus": []}, {"bench", "card"}),
    # the same checks and plan: nothing after it changes
    ("validate", "numerics", "full", {"validate"}),
])
def test_a_changed_key_reruns_that_stage_and_only_what_its_output_changes(built, stage, field, value, expected):
    """The record's key no longer matches (another llama.cpp build, another machine): the stage runs again; the
    stages after it run only where its new output changed their inputs."""
    path = built.parent / "work" / "records" / f"{stage}-Q8_0.json"
    saved = json.loads(path.read_text())
    assert field in saved["key"]
    saved["key"][field] = value
    path.write_text(json.dumps(saved))
    result = statuses(built)
    assert ran(result) == expected, result


def test_force_stage_runs_it_and_every_stage_after_it(built):
    why: dict[str, str] = {}
    assert ran(statuses(built, "--force-stage", "bench", details=why)) == {"bench", "shards", "card"}
    assert set(why.values()) == {"forced"}


def test_a_record_of_another_schema_is_absent_and_says_so(built):
    path = built.parent / "work" / "records" / "quantize-Q8_0.json"
    saved = json.loads(path.read_text())
    saved["schema_version"] = 1
    path.write_text(json.dumps(saved))
    proc = run_moeq("quantize", "--config", str(built), "--quant", "Q8_0")
    assert proc.returncode == 0, proc.stderr
    assert (f"{path}: written by another moeq (record schema 1, this moeq reads 2); quantize will run again"
            in proc.stderr)
    assert json.loads(path.read_text())["schema_version"] == 2


def test_an_output_changed_behind_the_records_back_is_made_again(built):
    quant = built.parent / "work" / "quants" / "tiny-phimoe-Q8_0.gguf"
    data = bytearray(quant.read_bytes())
    data[-1] ^= 0xFF
    quant.write_bytes(bytes(data))
    why: dict[str, str] = {}
    assert ran(statuses(built, details=why)) == {"quantize", "card"}  # the same bytes: only the staged link is renewed
    assert why == {"quantize": "outputs changed since the record", "card": "outputs changed since the record"}


def test_a_record_names_its_key_and_time(built):
    saved = json.loads((built.parent / "work" / "records" / "quantize-Q8_0.json").read_text())
    assert set(saved) == {"schema_version", "key", "wall_s", "record"}
    assert set(saved["key"]) == {"source_sha256", "options", "tool_commit"}
    assert saved["key"]["source_sha256"] == saved["record"]["source"]["sha256"]
    assert re.fullmatch(r"[0-9a-f]+", saved["key"]["tool_commit"]) and saved["wall_s"] > 0


def test_the_runner_keys_every_tool_made_output_on_the_tools_commit(built):
    """The tool commit comes from the stage's declaration (Stage.tool), not from a key written by hand: the
    shards stage, which once left it out, reruns when another llama-gguf-split would split the file."""
    edit(built, "hub.max_shard_size", "2MB")
    assert "shards" in ran(statuses(built))
    records = built.parent / "work" / "records"
    for name in ("quantize-Q8_0", "bench-Q8_0", "shards-Q8_0"):
        assert re.fullmatch(r"[0-9a-f]+", json.loads((records / f"{name}.json").read_text())["key"]["tool_commit"])
    saved = json.loads((records / "shards-Q8_0.json").read_text())
    saved["key"]["tool_commit"] = "another-build"
    (records / "shards-Q8_0.json").write_text(json.dumps(saved))
    why: dict[str, str] = {}
    assert ran(statuses(built, details=why)) == {"shards", "card"}  # new shard files: the staged repo links them
    assert why == {"shards": "changed: tool_commit", "card": "outputs changed since the record"}


def test_a_workspace_from_before_the_fetch_stage_was_named_keeps_its_source(built):
    """records/source.json, as moeq wrote the fetch stage's record before: still current, nothing fetched again."""
    records = built.parent / "work" / "records"
    saved = json.loads((records / "fetch.json").read_text())
    saved["record"]["stage"] = "source"
    (records / "source.json").write_text(json.dumps(saved))
    (records / "fetch.json").unlink()
    assert ran(statuses(built)) == set()

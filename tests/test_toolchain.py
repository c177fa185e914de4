"""Toolchain discovery and `moeq doctor`, on the real pinned build."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import gguf
import pytest

from moeq import quant_types
from moeq.config.yaml_nodes import CONFIG_FIX
from moeq.errors import ToolError
from moeq.toolchain import PINNED_COMMIT, TOOLS, Toolchain, parse_version, pinned_bin_dir

from conftest import HUB_TOKEN, pipeline_file, run_moeq


def test_parse_version():
    build = parse_version("version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with GNU 12.2.0 for Linux x86_64\n")
    assert (build.version, build.build, build.commit) == ("0.5.0-dev", "1", "0c1e570")
    assert build.compiler == "GNU 12.2.0" and build.target == "Linux" or build.target.startswith("Linux")
    assert build.pinned
    assert parse_version("usage: llama-quantize ...") is None


def test_every_tool_resolves_to_the_pinned_build(toolchain):
    for name in TOOLS:
        tool = toolchain.tool(name)
        assert tool.path.is_file(), name
        assert tool.build.commit == PINNED_COMMIT, (name, tool.build)
        assert tool.found_via in ("cache", "env", "config", "PATH")


def test_quant_table_matches_llama_quantize_help(toolchain):
    """moeq's list of quant types is exactly the pinned llama-quantize's list."""
    proc = subprocess.run([str(toolchain.path("llama-quantize")), "--help"], capture_output=True, text=True)
    listed = re.findall(r"^\s+(?:(\d+)\s+or\s+)?(\w+)\s+:", proc.stdout + proc.stderr, re.M)
    from_help = {name: int(ftype) if ftype else None for ftype, name in listed}
    assert set(from_help) == set(quant_types.QUANT_TYPES)
    for name, ftype in from_help.items():
        if ftype is not None:
            assert quant_types.QUANT_TYPES[name].file_type == ftype, name


def test_lookup_order_config_env_cache(tmp_path, monkeypatch, toolchain):
    real = toolchain.path("llama-completion")
    config_bin, env_bin = tmp_path / "config-bin", tmp_path / "env-bin"
    for folder in (config_bin, env_bin):
        folder.mkdir()
        (folder / "llama-completion").symlink_to(real)
    monkeypatch.setenv("MOEQ_LLAMA_CPP_BIN", str(env_bin))
    assert Toolchain(config_bin).locate("llama-completion") == ("config", config_bin / "llama-completion")
    assert Toolchain().locate("llama-completion") == ("env", env_bin / "llama-completion")
    monkeypatch.delenv("MOEQ_LLAMA_CPP_BIN")
    assert Toolchain().locate("llama-completion") == ("cache", pinned_bin_dir() / "llama-completion")


def test_missing_tool_error_names_tool_places_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQ_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("MOEQ_LLAMA_CPP_BIN", str(tmp_path / "nothing-here"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with pytest.raises(ToolError) as info:
        Toolchain().tool("llama-bench")
    message = str(info.value)
    assert message.startswith("llama-bench: not found (looked in ")
    assert str(tmp_path / "nothing-here" / "llama-bench") in message
    assert str(tmp_path / "empty-cache" / "llama.cpp" / PINNED_COMMIT / "bin" / "llama-bench") in message
    assert message.endswith("run scripts/setup, or set MOEQ_LLAMA_CPP_BIN to a folder holding the llama.cpp binaries")


def _partial_bin(tmp_path: Path, toolchain, leave_out: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in TOOLS:
        if name != leave_out:
            (folder / name).symlink_to(toolchain.path(name))
    return folder


def _isolated_env(tmp_path: Path, bin_dir: Path) -> dict:
    return {"MOEQ_LLAMA_CPP_BIN": str(bin_dir), "MOEQ_CACHE_DIR": str(tmp_path / "no-cache"),
            "PATH": os.path.dirname(os.sys.executable) + ":/usr/bin:/bin"}


def test_doctor_passes_after_setup(toolchain):
    proc = run_moeq("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert [t["name"] for t in report["tools"]] == list(TOOLS)
    assert all(t["commit"] == PINNED_COMMIT for t in report["tools"])
    # moeq's log flush at exit, in every llama-* tool (ggml-rpc-server logs without libllama-common's thread)
    flushed = {t["name"] for t in report["tools"] if t["log_flush"]}
    assert flushed == {name for name in TOOLS if name.startswith("llama-")}
    assert all("llama.cpp 0c1e570 with moeq's log flush at exit" in t["detail"] for t in report["tools"]
               if t["name"] in flushed)
    assert report["packages"]["gguf"].startswith("0.19")


def test_doctor_notes_a_llama_tool_without_the_log_flush(tmp_path, toolchain):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in TOOLS:
        (folder / name).symlink_to(toolchain.path(name))
    proc = run_moeq("doctor", "--json", env=_isolated_env(tmp_path, folder))
    report = json.loads(proc.stdout)
    [perplexity] = [t for t in report["tools"] if t["name"] == "llama-perplexity"]
    assert perplexity["log_flush"] is None and "without moeq's log flush at exit" in perplexity["detail"]


def test_doctor_fails_when_a_tool_is_missing(tmp_path, toolchain):
    env = _isolated_env(tmp_path, _partial_bin(tmp_path, toolchain, leave_out="llama-perplexity"))
    proc = run_moeq("doctor", env=env)
    assert proc.returncode == 7
    assert "problem: llama-perplexity: not found (looked in" in proc.stdout
    assert proc.stderr.strip() == "error: moeq doctor: found problems with: llama-perplexity; fix what the lines above name"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_doctor_fails_when_a_tool_is_broken(tmp_path, toolchain):
    folder = _partial_bin(tmp_path, toolchain, leave_out="llama-bench")
    fake = folder / "llama-bench"
    fake.write_text("#!/bin/sh\necho 'segfault in the middle of nowhere' >&2\nexit 139\n")
    fake.chmod(0o755)
    proc = run_moeq("doctor", "--json", env=_isolated_env(tmp_path, folder))
    assert proc.returncode == 7
    bench = next(t for t in json.loads(proc.stdout)["tools"] if t["name"] == "llama-bench")
    assert bench["ok"] is False
    assert "--version exited 139 without a version line (segfault in the middle of nowhere)" in bench["detail"]


def test_doctor_never_shows_the_token(tmp_path, toolchain):
    secret = "hf_" + "Zq7" * 12
    proc = run_moeq("doctor", "--config", "examples/tiny-phimoe.yaml", env={"HF_TOKEN": secret})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Hub token present: yes" in proc.stdout
    assert secret not in proc.stdout + proc.stderr
    assert secret[:8] not in proc.stdout + proc.stderr
    assert "pipeline needs" in proc.stdout


def test_doctor_disk_refusal_is_reported(tmp_path, toolchain):
    """A pipeline that needs more than the disk has fails doctor (parameters set absurdly high)."""
    text = (Path(__file__).parent.parent / "pipeline.yaml").read_text()
    text = text.replace("parameters: 41873153472", "parameters: 4000000000000000").split("\ntoolchain:")[0]
    text = text.replace("workspace: work", f"workspace: {tmp_path / 'ws'}")
    cfg = tmp_path / "huge.yaml"
    cfg.write_text(text)
    proc = run_moeq("doctor", "--json", "--config", str(cfg))
    assert proc.returncode == 7
    disk = json.loads(proc.stdout)["disk"]
    assert disk["ok"] is False and disk["needed_bytes"] > disk["free_bytes"]
    assert proc.stderr.splitlines() == [f"pipeline: {cfg} (--config)", "error: moeq doctor: found problems with: disk space; fix what the lines above name"]


def test_doctor_disk_plan_is_the_peak_not_the_sum(tmp_path, toolchain):
    """The release pipeline: the safetensors download is deleted once converted, so the peak is the F16 with every
    quant, the F16 logits (none known before the fetch) and the choice's other candidate of the largest quant with an
    importance matrix (Q4_K_M's), not all of it together;
    a later fetch --force is reported beside it (its searches: test_doctor_counts_the_release_pipelines_recipe_searches)."""
    text = (Path(__file__).parent.parent / "pipeline.yaml").read_text().split("\ntoolchain:")[0]
    cfg = tmp_path / "release.yaml"
    cfg.write_text(text.replace("workspace: work", f"workspace: {tmp_path / 'ws'}").replace(
        ", recipe: search, budget: stock}", "}"))
    proc = run_moeq("doctor", "--json", "--config", str(cfg))
    disk = json.loads(proc.stdout)["disk"]
    params = 41873153472
    f16 = 2 * params
    quants = {q: int(params * quant_types.QUANT_TYPES[q].approx_bpw / 8) for q in ("Q8_0", "Q4_K_M", "Q2_K")}
    items = {i["what"]: i["bytes"] for i in disk["items"]}
    assert items["safetensors download (deleted once converted)"] == f16
    assert items["the choice's candidate not published, of the largest quant with an importance matrix (while it is "
                 "measured)"] == quants["Q4_K_M"]
    assert disk["peak_bytes"] == f16 + sum(quants.values()) + quants["Q4_K_M"]
    assert disk["refetch_bytes"] == f16 + sum(quants.values()) + 2 * f16
    assert "a later moeq fetch --force downloads beside it all" in run_moeq("doctor", "--config", str(cfg)).stdout


def test_doctor_counts_the_release_pipelines_recipe_searches(tmp_path, toolchain):
    """pipeline.yaml searches Q4_K_M and Q2_K: each job counts its search's per-type files (kept), the one being made
    and two candidates while the search runs, on top of the peak without a search; the per-type files of a Q2_K
    search are under a third of six whole K files, and the two rungs' on one machine under four fifths (with the IQ
    types between the K ones the two rungs' neighbours overlap less: 124 GB)."""
    text = (Path(__file__).parent.parent / "pipeline.yaml").read_text().split("\ntoolchain:")[0]
    searched = ", recipe: search, budget: stock}"
    assert text.count(searched) == 2
    cfg, before = tmp_path / "release.yaml", tmp_path / "before.yaml"
    cfg.write_text(text.replace("workspace: work", f"workspace: {tmp_path / 'ws'}"))
    before.write_text(cfg.read_text().replace(searched, "}"))
    assert run_moeq("check-config", "--config", str(cfg)).returncode == 0
    params = 41873153472

    def bits(*types: str) -> float:
        return sum(8 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][1]
                   / gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] for t in types)

    six = int(params * bits("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0") / 8)
    for jobs, limit in ((["Q2_K"], six / 3), (["Q4_K_M"], six), ([], 4 * six / 5)):
        args = [a for j in jobs for a in ("--job", j)]
        disk = json.loads(run_moeq("doctor", "--json", "--config", str(cfg), *args).stdout)["disk"]
        stock = json.loads(run_moeq("doctor", "--json", "--config", str(before), *args).stdout)["disk"]
        items = {i["what"]: i["bytes"] for i in disk["items"]}
        files = items["the recipe search's per-type files (kept for the next search)"]
        assert files < limit, jobs
        being_made = items["the per-type file being made (llama-quantize writes it whole, moeq keeps what the search "
                           "needs)"]
        largest = max(size for what, size in items.items() if what.endswith(".gguf") and "Q8_0" not in what)
        candidates = items["the recipe search's assembled candidate and searched file (while it runs)"]
        assert candidates == 2 * largest
        beside = sum(size for what, size in items.items() if not what.startswith("safetensors download"))
        assert beside == sum(i["bytes"] for i in stock["items"] if not i["what"].startswith("safetensors download")) \
            + files + being_made + candidates
        assert disk["peak_bytes"] == max(stock["peak_bytes"], beside) > stock["peak_bytes"]
    q2_k = {i["what"]: i["bytes"] for i in json.loads(run_moeq(
        "doctor", "--json", "--config", str(cfg), "--job", "Q2_K").stdout)["disk"]["items"]}
    # with the importance matrix, gate and up (Q2_K in the stock file) may be IQ2_S, Q2_K or IQ3_XXS; down (Q3_K)
    # IQ3_XXS, Q3_K or IQ4_XS: the next type either side by bits per weight
    expected = params * (2 * bits("IQ2_S", "Q2_K", "IQ3_XXS") + bits("IQ3_XXS", "Q3_K", "IQ4_XS")) / 3 / 8
    assert q2_k["the recipe search's per-type files (kept for the next search)"] == pytest.approx(expected, rel=1e-9)


def test_quant_sizes_follow_the_per_layer_recipe():
    """Q4_K_M gives ffn_down Q6_K in llama.cpp's "more bits" layers: every layer of 1, half of 2 and of 32."""
    assert [quant_types.more_bits_share(n) for n in (1, 2, 8, 32)] == [1.0, 0.5, 0.5, 0.5]
    one, many = (quant_types.estimated_bytes("Q4_K_M", 10**9, n) for n in (1, 32))
    assert one / many == pytest.approx(1.07, abs=0.005)  # what a one-layer rehearsal measured beside the flat rule
    assert quant_types.estimated_bytes("Q8_0", 10**9, 1) == quant_types.estimated_bytes("Q8_0", 10**9, 32)


def test_doctor_with_bad_config_names_file_and_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {}\n")
    proc = run_moeq("doctor", "--config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr == f"error: {cfg}:1: (top level): missing required key 'source'; {CONFIG_FIX}\n"


def test_doctor_checks_one_job_of_a_release_across_machines(tmp_path, toolchain):
    """--job Q4_K_M: the F16 (and its download) with Q4_K_M's file and its choice candidate alone; --job imatrix: the
    F16 and its download alone. Each is the peak of that job's runner, at most the whole ladder's."""
    text = (Path(__file__).parent.parent / "pipeline.yaml").read_text().split("\ntoolchain:")[0]
    cfg = tmp_path / "release.yaml"  # without its searches (test_doctor_counts_the_release_pipelines_recipe_searches)
    cfg.write_text(text.replace("workspace: work", f"workspace: {tmp_path / 'ws'}").replace(
        ", recipe: search, budget: stock}", "}"))

    def disk(*jobs: str) -> dict:
        proc = run_moeq("doctor", "--json", "--config", str(cfg), *[a for j in jobs for a in ("--job", j)])
        return json.loads(proc.stdout)["disk"]

    params = 41873153472
    f16 = 2 * params
    q4 = int(params * quant_types.QUANT_TYPES["Q4_K_M"].approx_bpw / 8)
    one = {i["what"]: i["bytes"] for i in disk("Q4_K_M")["items"]}
    assert one == {"F16 source (GGUF)": f16, "safetensors download (deleted once converted)": f16,
                   "phi-3.5-moe-Q4_K_M.gguf": q4,
                   "the choice's candidate not published, of the largest quant with an importance matrix (while it is "
                   "measured)": q4}
    assert disk("Q4_K_M")["peak_bytes"] == max(2 * f16, f16 + 2 * q4)
    assert [i["what"] for i in disk("imatrix")["items"]] == ["F16 source (GGUF)",
                                                             "safetensors download (deleted once converted)"]
    assert disk("imatrix")["peak_bytes"] == 2 * f16 <= disk()["peak_bytes"]
    proc = run_moeq("doctor", "--config", str(cfg), "--job", "Q5_K_M")
    assert proc.returncode != 0 and "no quant 'Q5_K_M' in the ladder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_doctor_asks_the_hub_whether_the_token_may_write_to_the_namespace(tmp_path, test_hub):
    """"Hub token present: no" passed for a pipeline that pushes, and a token that could not write there was found
    out at the push, hours later. doctor asks the Hub who the token is (whoami) for each namespace the pipeline
    pushes to, and fails when the pipeline pushes (hub.push, or a release job) and the token may not write there."""
    from conftest import HUB_USER

    pushing = pipeline_file(tmp_path / "pushing", hub={"namespace": HUB_USER, "push": True})
    ours = run_moeq("doctor", "--config", str(pushing), env=test_hub.env)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    out = ours.stdout.replace("\n", " ")
    assert f"Hub namespace {HUB_USER}: the token may write there: the token is {HUB_USER}'s, with write access" in out
    assert ours.stdout.rstrip().endswith("verdict: ready (tools, disk and the Hub)")
    other = run_moeq("doctor", "--config", str(pushing), "--json", env={**test_hub.env, "HF_TOKEN": "hf_otherUserToken"})
    assert other.returncode == 7
    access = json.loads(other.stdout)["hub"]["access"]
    assert access == [{"namespace": HUB_USER, "ok": False,
                       "detail": f"the token is someone-else's, who is not a member of {HUB_USER}"}]
    assert other.stderr.strip().endswith(f"error: moeq doctor: found problems with: writing to {HUB_USER} on the Hub; "
                                         "fix what the lines above name")
    local = pipeline_file(tmp_path / "local")  # hub.push unset: a missing token is said, not a failure
    tokenless = {**test_hub.env, "HF_TOKEN": ""}
    proc = run_moeq("doctor", "--config", str(local), env=tokenless)
    assert proc.returncode == 0 and "needed only to push" in proc.stdout.replace("\n", " ")
    job = run_moeq("doctor", "--config", str(local), "--job", "Q8_0", env=tokenless)  # a release job pushes
    assert job.returncode == 7 and "writing to moeq-test on the Hub" in job.stderr
    assert HUB_TOKEN not in ours.stdout + ours.stderr + other.stdout + other.stderr


@pytest.mark.parametrize("info,ok,detail", [
    ({"name": "me", "orgs": [], "auth": {"accessToken": {"role": "read"}}}, False, "the token of me is read-only"),
    ({"name": "me", "orgs": [{"name": "team", "roleInOrg": "write"}], "auth": {"accessToken": {"role": "write"}}},
     True, "the token is me's, write in team"),
    ({"name": "me", "orgs": [{"name": "team", "roleInOrg": "read"}], "auth": {"accessToken": {"role": "write"}}},
     False, "me's role in team is read, which may not write"),
    ({"name": "me", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {"scoped": [
        {"entity": {"type": "org", "name": "team"}, "permissions": ["repo.content.read", "repo.write"]}]}}}},
     True, "the fine-grained token of me may write to team (repo.write)"),
    ({"name": "me", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {"scoped": [
        {"entity": {"type": "org", "name": "team"}, "permissions": ["repo.content.read"]}]}}}},
     False, "the fine-grained token of me has no repo.write on team"),
    ({"name": "me", "orgs": "not a list", "auth": []}, False, "the token is me's, who is not a member of team"),
    ({"name": "me", "auth": {"accessToken": {"role": "fineGrained", "fineGrained": {"scoped": [
        {"entity": {"name": "team"}, "permissions": "not repo.write but a string"}]}}}},
     False, "the fine-grained token of me has no repo.write on team"),
])
def test_whether_a_token_may_write_is_read_from_the_hubs_answer(info, ok, detail):
    from moeq.hub.client import can_write

    assert can_write(info, "team") == (ok, detail)


@pytest.mark.parametrize("arch", ["phimoe", "qwen3moe"])
def test_the_types_made_only_with_an_importance_matrix_are_the_pinned_builds(tmp_path, toolchain, arch):
    """quant_types.REQUIRES_IMATRIX, which check-config refuses without `imatrix:` and the choice makes no candidate
    without, is exactly the set of types whose mixture `llama-quantize --dry-run` says "will require an imatrix" for,
    of every type it offers, on a MoE of two architectures; each type's dry run types every tensor it quantizes."""
    from moeq.synth import SynthSpec, write_synth_model

    model = write_synth_model(tmp_path / f"{arch}-F16.gguf", SynthSpec(), arch)
    offered = [name for name in quant_types.QUANT_TYPES if name not in ("F16", "BF16", "F32", "COPY")]
    mixtures = {name: quant_types.mixture(toolchain.path("llama-quantize"), model, name) for name in offered}
    assert {name for name, mix in mixtures.items() if mix.requires_imatrix} == quant_types.REQUIRES_IMATRIX
    assert all(mix.types for mix in mixtures.values())
    pure = {name: set(quant_types.mixture(toolchain.path("llama-quantize"), model, name, ["--pure"]).types.values())
            for name in quant_types.BASE_TENSOR_TYPE}
    assert set(quant_types.BASE_TENSOR_TYPE) == set(offered)  # every type offered has its base type here
    assert {name: types - {"Q8_0"} for name, types in pure.items()} == {  # Q8_0: rows no K block fits
        name: {base} - {"Q8_0"} for name, base in quant_types.BASE_TENSOR_TYPE.items()}
    assert set(mixtures["IQ2_XXS"].types.values()) >= {"IQ2_XXS"} and set(mixtures["IQ4_XS"].types.values()) >= {
        "IQ4_XS"}

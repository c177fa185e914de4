"""Other llama.cpp MoE architectures end to end: Qwen3-MoE, Mixtral (llama with 8 experts), Qwen2-MoE (shared
experts). Each tiny example is built with every stage (bench through the RPC device), its card linted and
verified, its memory plan compared with llama.cpp's own buffers, and its validation shown to catch a changed
hyperparameter of that architecture. Dense models and architectures without experts are refused by name."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from moeq.architectures import moe_architectures
from moeq.cards.lint import lint_card
from moeq.manifest import read_manifest
from moeq.synth import tensor_layout, write_synth_model
from moeq.config import SynthSpec
from moeq.runner import tool_env

from conftest import REPO, run_moeq

LADDER = ("Q8_0", "Q4_K_M", "Q2_K")
# example, gguf architecture, a hyperparameter of its own that validate must compare
ARCHS = {
    "tiny-qwen3moe": ("qwen3moe", "qwen3moe.attention.key_length"),
    "tiny-mixtral": ("llama", "llama.vocab_size"),
    "tiny-qwen2moe": ("qwen2moe", "qwen2moe.expert_shared_feed_forward_length"),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def built(request, tmp_path_factory, toolchain, rpc_device):
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    config = folder / f"{name}.yaml"
    text = (REPO / "examples" / f"{name}.yaml").read_text().replace("rpc: local", f"rpc: {rpc_device}")
    config.write_text(re.sub(r"^workspace: .*$", "workspace: work", text, flags=re.M))
    proc = run_moeq("build", "--config", str(config), "--all", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return name, config, folder / "work", json.loads(proc.stdout)


def test_every_stage_runs_and_the_card_lints_and_verifies(built):
    name, _, ws, summary = built
    assert summary["ok"] and summary["single_repo"]
    for quant in summary["quants"]:
        assert {s["stage"]: s["status"] for s in quant["stages"]} == {
            "fetch": "ran", "imatrix": "skipped", "recipe": "skipped", "choice": "skipped", "quantize": "ran",
            "validate": "ran", "bench": "ran", "shards": "ran", "card": "ran", "push": "skipped"}
    card = ws / "repos" / "ladder" / "README.md"
    text = card.read_text()
    manifest = read_manifest(card.parent / "moeq-manifest.json")
    assert lint_card(text, "README.md", manifest) == []
    assert run_moeq("card", "verify", str(card)).returncode == 0
    arch = ARCHS[name][0]
    assert f"architecture `{arch}`" in text and f"this `{arch}` model" in text
    assert "phimoe" not in text.lower() and "Phi-3.5" not in text
    assert ("The shared experts (`ffn_down_shexp`, `ffn_gate_shexp`, `ffn_up_shexp`)" in text) == (arch == "qwen2moe")
    for entry in manifest.quants:
        assert entry.records.quantize.model.expert_tensors == ["ffn_down_exps", "ffn_gate_exps", "ffn_up_exps"]


def test_the_plan_is_what_llama_cpp_puts_on_the_device(built):
    """Model buffer and KV cache on the RPC device equal the plan in all-GPU, --cpu-moe and -ncmoe 1, shared
    experts (Qwen2-MoE) staying on the device, Qwen3's head size (twice embd / heads) in the KV cache."""
    _, _, ws, _ = built
    for quant in LADDER:
        record = json.loads((ws / "records" / f"bench-{quant}.json").read_text())["record"]
        assert record["errors"] == [] and record["not_measured"] == []
        measured = {m["mode"]: m for m in record["memory"]}
        assert sorted(measured) == ["cpu-moe", "gpu", "ncmoe 1"]
        for mode, m in measured.items():
            assert m["device_mib"]["model"] == m["planned_mib"]["model"] and m["difference_mib"]["model"] == 0, mode
            assert m["device_mib"]["KV"] == m["planned_mib"]["KV"], mode
        assert measured["cpu-moe"]["device_mib"]["model"] < measured["ncmoe 1"]["device_mib"]["model"] < \
            measured["gpu"]["device_mib"]["model"]


def test_eight_experts_get_llama_cpps_eight_expert_recipe(built):
    """Qwen3-MoE's and Mixtral's 8 experts: attn_v and attn_k in Q8_0, attn_output in Q5_K for Q4_K_M and Q2_K,
    which validate expects (the type mix check passed in the build)."""
    name, _, ws, _ = built
    for quant in ("Q4_K_M", "Q2_K"):
        rows = json.loads((ws / "records" / f"quantize-{quant}.json").read_text())["record"]["tensors"]
        types = {r["name"]: r["type_after"] for r in rows}
        eight = name != "tiny-qwen2moe"
        assert (types["blk.0.attn_v.weight"] == "Q8_0") == eight and (types["blk.1.attn_k.weight"] == "Q8_0") == eight
        assert (types["blk.0.attn_output.weight"] == "Q5_K") == eight
        validated = json.loads((ws / "records" / f"validate-{quant}.json").read_text())["record"]
        assert validated["ok"] and next(c for c in validated["checks"] if c["name"] == "type mix")["ok"]


def _set_key(path: Path, key: str, value: int) -> None:
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value  # a scalar: written in place, through gguf-py's memory map
    del reader


def test_validate_catches_a_changed_hyperparameter_of_the_architecture(built, tmp_path):
    name, _, ws, _ = built
    key = ARCHS[name][1]
    changed = tmp_path / "changed.gguf"
    shutil.copy(ws / "quants" / f"{name}-Q8_0.gguf", changed)
    before = gguf.GGUFReader(changed).fields[key].contents()
    _set_key(changed, key, before + 256)
    proc = run_moeq("validate", str(changed), "--against", str(ws / "source" / f"{name}-F16.gguf"), "--json")
    assert proc.returncode == 7, proc.stdout + proc.stderr
    model = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "model")
    assert not model["ok"] and model["detail"] == f"{key}: {before + 256} != source {before}"


# ---------------------------------------------------------------- what is not a MoE model


def test_the_moe_architectures_come_from_gguf_pys_tables():
    archs = moe_architectures()
    assert {"phimoe", "qwen3moe", "llama", "qwen2moe", "deepseek2", "olmoe", "gpt-oss"} <= set(archs)
    assert not {"gemma", "bert", "qwen2", "phi3"} & set(archs)


def _dense(path: Path, arch: str) -> Path:
    """A small dense model: the qwen3moe tiny model's attention, one plain FFN, no experts."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for name, shape, _ in tensor_layout(SynthSpec(layers=1), "qwen3moe"):
        if "exps" not in name and "gate_inp" not in name:
            writer.add_tensor(name, np.zeros(tuple(reversed(shape)), dtype=np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((512, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,message", [
    ("llama", "a dense llama model (0 ffn_*_exps tensors, llama.expert_count None): --cpu-moe has no experts "
              "to move; moeq quantizes mixture-of-experts models"),
    ("gemma", "architecture 'gemma' has no mixture-of-experts tensors in llama.cpp (gguf-py's table of its "
              "tensors holds no ffn_*_exps); moeq quantizes MoE models for --cpu-moe: llama, "),
])
def test_a_dense_model_or_an_architecture_without_experts_is_refused(tmp_path, arch, message):
    model = _dense(tmp_path / "dense.gguf", arch)
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"model: {{name: dense, base_model: a/b, license: mit, quantized_by: me, file_stem: dense}}\n"
                      f"source: {{kind: local, path: {model}}}\nquants: [Q8_0]\nhub: {{namespace: me}}\n")
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == f"error: Q8_0: quantize failed: {model}: {message}" + (
        ", ".join(moe_architectures())[len("llama, "):] if arch == "gemma" else "")
    assert "Traceback" not in proc.stderr and not (tmp_path / "work" / "quants" / "dense-Q8_0.gguf").exists()


def test_synth_writes_each_architecture_llama_cpp_loads(tmp_path, toolchain):
    """`moeq synth tiny-moe --arch A`: a file llama.cpp loads and runs, with the tensors gguf-py lists for A."""
    for arch in ("qwen3moe", "llama-moe", "qwen2moe"):
        out = tmp_path / f"{arch}.gguf"
        proc = run_moeq("synth", "tiny-moe", str(out), "--arch", arch, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["arch"] == arch
        header = gguf.GGUFReader(out)
        names = {t.name for t in header.tensors}
        assert ("blk.0.attn_q_norm.weight" in names) == (arch == "qwen3moe")
        assert ("blk.1.ffn_up_shexp.weight" in names) == (arch == "qwen2moe")
        assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2moe")
        tool = toolchain.path("llama-completion")
        run = subprocess.run([str(tool), "-m", str(out), "-p", "The", "-n", "4", "-no-cnv", "--no-warmup"],
                             capture_output=True, text=True, errors="replace", timeout=120,
                             env={**os.environ, **tool_env(tool)})
        assert run.returncode == 0, run.stderr[-2000:]
    assert write_synth_model(tmp_path / "again.gguf", SynthSpec(experts=8), "qwen3moe", name="tiny-qwen3moe") \
        .read_bytes() == (tmp_path / "qwen3moe.gguf").read_bytes()


@pytest.mark.parametrize("example", ["qwen3-30b-a3b.yaml", "mixtral-8x7b-instruct.yaml"])
def test_the_real_examples_load_and_pass_doctor_but_for_the_disk(example, toolchain):
    """Real releases of other architectures: check-config passes; doctor finds nothing wrong but, on a small
    machine, the disk (tens of GB for the F16 and its quants)."""
    config = REPO / "examples" / example
    proc = run_moeq("check-config", "--config", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    assert {q["repo"] for q in json.loads(proc.stdout)["quants"]} == {"moeq/" + config.stem.replace(
        "qwen3-30b-a3b", "Qwen3-30B-A3B").replace("mixtral-8x7b-instruct", "Mixtral-8x7B-Instruct-v0.1") + "-GGUF"}
    proc = run_moeq("doctor", "--config", str(config))
    assert proc.returncode == 0 or proc.stderr.splitlines()[-1] == "error: moeq doctor: found problems with: disk space; fix what the lines above name", \
        proc.stdout + proc.stderr

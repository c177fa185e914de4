"""The tiny phimoe model: faithful layout, deterministic, and accepted by the real llama.cpp tools."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import replace

import gguf
import numpy as np

from moeq import synth
from moeq.config import SynthSpec
from moeq.synth import parameter_count, synth_spec, tensor_layout, write_synth_model
from moeq.runner import tool_env

from conftest import REPO, run_moeq

PER_BLOCK = ["attn_norm.weight", "attn_norm.bias", "attn_q.weight", "attn_q.bias", "attn_k.weight",
             "attn_k.bias", "attn_v.weight", "attn_v.bias", "attn_output.weight", "attn_output.bias",
             "ffn_norm.weight", "ffn_norm.bias", "ffn_gate_inp.weight", "ffn_gate_exps.weight",
             "ffn_up_exps.weight", "ffn_down_exps.weight"]
GLOBAL = ["token_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight", "output.bias",
          "rope_factors_long.weight", "rope_factors_short.weight"]


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_layout_and_metadata(tiny_model):
    reader = gguf.GGUFReader(tiny_model)
    assert field(reader, "general.architecture") == "phimoe"
    assert field(reader, "general.file_type") == 1
    names = {t.name: t for t in reader.tensors}
    expected = set(GLOBAL) | {f"blk.{i}.{n}" for i in range(2) for n in PER_BLOCK}
    assert set(names) == expected
    assert names["blk.0.ffn_gate_exps.weight"].shape.tolist() == [256, 512, 4]
    assert names["blk.1.ffn_down_exps.weight"].shape.tolist() == [512, 256, 4]
    assert names["blk.0.attn_k.weight"].shape.tolist() == [256, 128]
    assert names["output.bias"].shape.tolist() == [512]
    assert names["rope_factors_long.weight"].shape.tolist() == [32]
    assert names["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["blk.0.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    for key, value in [("phimoe.expert_count", 4), ("phimoe.expert_used_count", 2), ("phimoe.block_count", 2),
                       ("phimoe.embedding_length", 256), ("phimoe.feed_forward_length", 512),
                       ("phimoe.attention.head_count", 4), ("phimoe.attention.head_count_kv", 2),
                       ("phimoe.rope.dimension_count", 64), ("phimoe.context_length", 131072),
                       ("phimoe.rope.scaling.original_context_length", 4096)]:
        assert field(reader, key) == value, key
    assert abs(field(reader, "phimoe.rope.scaling.attn_factor") - 1.1902) < 1e-3
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == 512 and "<0x41>" in tokens
    assert tokens[field(reader, "tokenizer.ggml.bos_token_id")] == "<s>"
    assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == "<|endoftext|>"
    assert "<|assistant|>" in field(reader, "tokenizer.chat_template")


def test_real_model_dimensions_count_like_phi35_moe():
    real = SynthSpec(layers=32, experts=16, experts_used=2, embd=4096, ff=6400, heads=32, kv_heads=8, vocab=32064)
    assert parameter_count(real) == 41_873_153_472
    assert len(tensor_layout(real)) == 519
    assert synth_spec("phi-3.5-moe") == ("phimoe", real)
    assert synth_spec("phi-3.5-moe", layers=2, seed=3) == ("phimoe", replace(real, layers=2, seed=3))
    assert synth_spec(None, layers=None) == ("phimoe", SynthSpec())
    assert synth_spec(None, "qwen3moe") == ("qwen3moe", SynthSpec(experts=8))


def test_written_in_pieces_gives_the_same_bytes(tmp_path, monkeypatch):
    """Tensors are drawn and written in bounded pieces; the bytes are those of drawing each tensor whole."""
    spec = SynthSpec(layers=1, experts=4, embd=512, ff=512)
    whole = write_synth_model(tmp_path / "whole.gguf", spec).read_bytes()
    monkeypatch.setattr(synth, "CHUNK_ELEMENTS", 1000)  # every large tensor in many pieces, one not a multiple
    assert write_synth_model(tmp_path / "pieces.gguf", spec).read_bytes() == whole
    reader = gguf.GGUFReader(tmp_path / "pieces.gguf")
    expected = np.random.default_rng(0).standard_normal(512 * 512, dtype=np.float32)  # token_embd comes first
    assert np.array_equal(reader.get_tensor(0).data.ravel(), (0.02 * expected).astype(np.float16))


def test_deterministic_and_seeded(tmp_path):
    a = write_synth_model(tmp_path / "a.gguf")
    b = write_synth_model(tmp_path / "b.gguf")
    c = write_synth_model(tmp_path / "c.gguf", SynthSpec(seed=1))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_cli_synth_options(tmp_path):
    out = tmp_path / "three-layers.gguf"
    proc = run_moeq("synth", "tiny-phimoe", str(out), "--layers", "3", "--experts", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    reader = gguf.GGUFReader(out)
    assert field(reader, "phimoe.block_count") == 3 and field(reader, "phimoe.expert_count") == 8
    assert info["parameters"] == sum(int(np.prod(t.shape)) for t in reader.tensors)


def test_cli_synth_bad_options(tmp_path):
    out = tmp_path / "bad.gguf"
    proc = run_moeq("synth", "tiny-phimoe", str(out), "--ff", "500")
    assert proc.returncode == 3
    assert proc.stderr == "error: synth options: embd and ff must be multiples of 256 so K-quants apply; change them (moeq synth --help lists them)\n"
    assert not out.exists()
    proc = run_moeq("synth", "tiny-phimoe", str(out), "--preset", "phi-4")
    assert proc.returncode == 3 and proc.stderr == "error: --preset 'phi-4': not a preset; use one of phi-3.5-moe, qwen3-30b-a3b, mixtral-8x7b\n"


def test_generates_in_llama_completion(tiny_model, toolchain):
    tool = toolchain.path("llama-completion")
    command = [str(tool), "-m", str(tiny_model), "-p", "the cat", "-n", "12", "-c", "256", "-no-cnv", "--temp", "0",
               "-t", "2", "--seed", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120,
                          stdin=subprocess.DEVNULL, env={**os.environ, **tool_env(tool)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # llama.cpp's own timing summary counts the generated tokens.
    evals = [int(n) for n in re.findall(r"eval time =.*?/\s+(\d+) runs", proc.stderr)]
    assert evals and evals[-1] >= 11, proc.stderr[-1500:]
    prompt_at = proc.stdout.find("the cat")
    assert prompt_at >= 0 and len(proc.stdout) > prompt_at + len("the cat"), proc.stdout


def test_runs_in_llama_bench(tiny_model, toolchain):
    proc = subprocess.run(
        [str(toolchain.path("llama-bench")), "-m", str(tiny_model), "-p", "32", "-n", "8", "-r", "1",
         "-t", "2", "-o", "json"],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, **tool_env(toolchain.path("llama-bench"))})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert {(r["n_prompt"], r["n_gen"]) for r in results} == {(32, 0), (0, 8)}
    assert all(r["avg_ts"] > 0 for r in results)
    assert results[0]["model_n_params"] == parameter_count(SynthSpec())


def test_the_training_key_follows_the_weights_not_the_messages():
    """An edited error or progress message, docstring or comment keeps the cached trained model; a change to
    what is computed trains it again."""
    from moeq.synth_train import weights_code_sha256

    train, hf = ((REPO / "moeq" / name).read_text() for name in ("synth_train.py", "synth_hf.py"))
    key = weights_code_sha256([train, hf])
    message = '"training the tiny model needs torch, transformers and sentencepiece",'
    progress = 'on_message(f"training: step {step + 1}/{STEPS}, loss {loss.item():.3f}, '
    for edited in (train.replace(message, message.replace("needs", "requires")),
                   train.replace(progress, progress.replace("training: step", "step")),
                   train.replace('"""A tiny PhiMoE', '"""A small PhiMoE').replace("\nSTEPS = 1200", "\n# steps\nSTEPS = 1200")):
        assert edited != train
        assert weights_code_sha256([edited, hf]) == key
    for edited in (train.replace("\nSTEPS = 1200", "\nSTEPS = 1201"), train.replace("WARMUP = 50", "WARMUP = 51")):
        assert edited != train
        assert weights_code_sha256([edited, hf]) != key
    assert weights_code_sha256([train, hf.replace('"lm_head_bias": True', '"lm_head_bias": False')]) != key
    # The random weights synth_hf writes for tests are not what training uses.
    assert weights_code_sha256([train, hf.replace("* 0.02).astype(np.float16)", "* 0.03).astype(np.float16)")]) == key

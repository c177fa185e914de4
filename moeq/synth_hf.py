"""A tiny PhiMoE checkpoint in Hugging Face's layout: what `source.kind: hf` downloads and converts.

config.json (PhiMoEForCausalLM, longrope scaling, attention and lm_head biases), seeded float16
safetensors weights under the names microsoft/Phi-3.5-MoE-instruct uses, and a real SentencePiece
tokenizer (BPE with byte fallback) trained in a second on generated text. Needs the `convert` extra
(safetensors, sentencepiece).

    write_tiny_phimoe_hf(Path("tiny-phimoe-hf"), SynthSpec(vocab=320))
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from moeq.config import SynthSpec
from moeq.errors import InputError
from moeq.synth import (CONTEXT_LENGTH, ORIGINAL_CONTEXT_LENGTH, PHI35_CHAT_TEMPLATE, RMS_EPS, ROPE_FREQ_BASE,
                        check_spec, parameter_count)

MAX_HF_VOCAB = 32_000
MAX_HF_BYTES = 1 << 30

WORDS = ("the expert router picks two of sixteen experts for every token while attention stays dense "
         "quantization keeps the weights small and the card says what was measured on which machine "
         "memory on the graphics card holds the shared layers and system memory holds the experts").split()


def hf_config(spec: SynthSpec) -> dict:
    head_dim = spec.embd // spec.heads
    return {
        "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "torch_dtype": "float16",
        "hidden_size": spec.embd, "intermediate_size": spec.ff, "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
        "num_local_experts": spec.experts, "num_experts_per_tok": spec.experts_used, "vocab_size": spec.vocab,
        "attention_bias": True, "lm_head_bias": True, "hidden_act": "silu", "tie_word_embeddings": False,
        "max_position_embeddings": CONTEXT_LENGTH, "original_max_position_embeddings": ORIGINAL_CONTEXT_LENGTH,
        "rope_theta": ROPE_FREQ_BASE, "rms_norm_eps": RMS_EPS, "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": {"type": "longrope", "rope_type": "longrope",
                         "short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0] * (head_dim // 2),
                         "short_mscale": 1.243, "long_mscale": 1.243},
    }


def checkpoint_layout(spec: SynthSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """Each tensor of the checkpoint in file order: (name as microsoft/Phi-3.5-MoE-instruct names it, shape, how
    it is filled: "normal" or "ones")."""
    gqa = spec.embd // spec.heads * spec.kv_heads
    layout = [("model.embed_tokens.weight", (spec.vocab, spec.embd), "normal")]
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        for name, rows in (("q", spec.embd), ("k", gqa), ("v", gqa), ("o", spec.embd)):
            layout.append((f"{p}self_attn.{name}_proj.weight", (rows, spec.embd), "normal"))
            layout.append((f"{p}self_attn.{name}_proj.bias", (rows,), "normal"))
        layout.append((f"{p}block_sparse_moe.gate.weight", (spec.experts, spec.embd), "normal"))
        for e in range(spec.experts):
            layout.append((f"{p}block_sparse_moe.experts.{e}.w1.weight", (spec.ff, spec.embd), "normal"))
            layout.append((f"{p}block_sparse_moe.experts.{e}.w2.weight", (spec.embd, spec.ff), "normal"))
            layout.append((f"{p}block_sparse_moe.experts.{e}.w3.weight", (spec.ff, spec.embd), "normal"))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layout.append((f"{p}{norm}.weight", (spec.embd,), "ones"))
            layout.append((f"{p}{norm}.bias", (spec.embd,), "normal"))
    layout += [("model.norm.weight", (spec.embd,), "ones"), ("model.norm.bias", (spec.embd,), "normal"),
               ("lm_head.weight", (spec.vocab, spec.embd), "normal"), ("lm_head.bias", (spec.vocab,), "normal")]
    return layout


def _weights(spec: SynthSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    return {name: np.ones(shape, dtype=np.float16) if fill == "ones"
            else (rng.standard_normal(shape) * 0.02).astype(np.float16)
            for name, shape, fill in checkpoint_layout(spec)}


def train_tokenizer(lines: list[str], vocab: int) -> bytes:
    """A SentencePiece BPE model (byte fallback, <unk> <s> </s> as ids 0-2) trained on `lines`, as bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def hf_tensor_names(state: dict[str, np.ndarray], spec: SynthSpec) -> dict[str, np.ndarray]:
    """transformers' PhimoeForCausalLM state (router, fused gate_up/down experts) under the checkpoint's names."""
    out = {}
    for name, value in state.items():
        prefix, _, leaf = name.rpartition(".mlp.")
        if not prefix:
            out[name] = value
        elif leaf == "router.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = value
        elif leaf == "experts.gate_up_proj":  # [experts, 2 * ff, embd]: gate (w1) rows, then up (w3) rows
            for e in range(spec.experts):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = value[e, :spec.ff]
                out[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = value[e, spec.ff:]
        elif leaf == "experts.down_proj":
            for e in range(spec.experts):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = value[e]
        else:
            raise ValueError(f"{name}: no checkpoint name for this tensor")
    return {name: np.ascontiguousarray(value) for name, value in out.items()}


GENERATION_CONFIG = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


def write_tiny_phimoe_hf(folder: Path, spec: SynthSpec = SynthSpec(vocab=320), *,
                         weights: dict[str, np.ndarray] | None = None, tokenizer: bytes | None = None) -> Path:
    """Write the checkpoint into `folder`: seeded random weights and a tokenizer of generated text unless given
    (synth_train gives trained ones); the same spec always gives the same files."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise InputError("--format hf", "a Hugging Face checkpoint needs safetensors and sentencepiece",
                         "install them with .venv/bin/pip install -e '.[convert]'") from None
    if not 300 <= spec.vocab <= MAX_HF_VOCAB:
        raise InputError(f"synth option vocab = {spec.vocab}", "out of range for a trained tokenizer",
                         f"use 300 (256 byte tokens, specials and pieces) to {MAX_HF_VOCAB:,}")
    if weights is None:
        check_spec(spec)
        if 4 * parameter_count(spec) > MAX_HF_BYTES:  # the weights are made in memory, then written
            raise InputError("synth options", f"{parameter_count(spec):,} parameters, more than a checkpoint made in "
                             f"memory holds ({MAX_HF_BYTES >> 20} MiB)", "use fewer layers or experts")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(spec), indent=2) + "\n")
    save_file(weights if weights is not None else _weights(spec), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is None:
        rng = np.random.default_rng(spec.seed)
        tokenizer = train_tokenizer([" ".join(rng.choice(WORDS, size=12)) for _ in range(2000)], spec.vocab)
    (folder / "tokenizer.model").write_bytes(tokenizer)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": CONTEXT_LENGTH,
        "chat_template": PHI35_CHAT_TEMPLATE,  # the converter writes it into the GGUF (tokenizer.chat_template)
    }, indent=2) + "\n")
    # The checkpoint's recommended sampling, which the converter writes as general.sampling.* (llama.cpp's
    # defaults for the file) and the card shows beside its chat request.
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    return folder

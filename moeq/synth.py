"""A tiny but faithful phimoe model, for demos, tests and benchmarks.

The file has the tensor names, shapes, dtypes and metadata keys that llama.cpp's converter
writes for microsoft/Phi-3.5-MoE-instruct (biases, output bias, router, 3-D expert tensors,
longrope factor tensors, expert counts, a llama/SentencePiece vocabulary with byte tokens,
bos/eos and the Phi-3.5 chat template), scaled down. Weights are seeded random numbers, so
the same options always give the same bytes.

    write_tiny_phimoe(Path("tiny.gguf"), SynthSpec(layers=2))
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from moeq.config import SynthSpec
from moeq.errors import InputError

ARCH = "phimoe"
CONTEXT_LENGTH = 131072
ORIGINAL_CONTEXT_LENGTH = 4096
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5

PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
MIN_VOCAB = 3 + 256 + len(SPECIAL_TOKENS) + 1

T = gguf.MODEL_TENSOR


def _name(tensor: gguf.MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + "." + suffix


def tensor_layout(spec: SynthSpec) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    """(name, ggml shape, dtype) of every tensor, in the converter's order."""
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    head_dim = spec.embd // spec.heads
    gqa = head_dim * spec.kv_heads
    layout = [(_name(T.TOKEN_EMBD, "weight"), (spec.embd, spec.vocab), F16)]
    for i in range(spec.layers):
        layout += [
            (_name(T.ATTN_NORM, "weight", i), (spec.embd,), F32),
            (_name(T.ATTN_NORM, "bias", i), (spec.embd,), F32),
            (_name(T.ATTN_Q, "weight", i), (spec.embd, spec.embd), F16),
            (_name(T.ATTN_Q, "bias", i), (spec.embd,), F32),
            (_name(T.ATTN_K, "weight", i), (spec.embd, gqa), F16),
            (_name(T.ATTN_K, "bias", i), (gqa,), F32),
            (_name(T.ATTN_V, "weight", i), (spec.embd, gqa), F16),
            (_name(T.ATTN_V, "bias", i), (gqa,), F32),
            (_name(T.ATTN_OUT, "weight", i), (spec.embd, spec.embd), F16),
            (_name(T.ATTN_OUT, "bias", i), (spec.embd,), F32),
            (_name(T.FFN_NORM, "weight", i), (spec.embd,), F32),
            (_name(T.FFN_NORM, "bias", i), (spec.embd,), F32),
            (_name(T.FFN_GATE_INP, "weight", i), (spec.embd, spec.experts), F32),
            (_name(T.FFN_GATE_EXP, "weight", i), (spec.embd, spec.ff, spec.experts), F16),
            (_name(T.FFN_UP_EXP, "weight", i), (spec.embd, spec.ff, spec.experts), F16),
            (_name(T.FFN_DOWN_EXP, "weight", i), (spec.ff, spec.embd, spec.experts), F16),
        ]
    layout += [
        (_name(T.OUTPUT_NORM, "weight"), (spec.embd,), F32),
        (_name(T.OUTPUT_NORM, "bias"), (spec.embd,), F32),
        (_name(T.OUTPUT, "weight"), (spec.embd, spec.vocab), F16),
        (_name(T.OUTPUT, "bias"), (spec.vocab,), F32),
        (_name(T.ROPE_FACTORS_LONG, "weight"), (head_dim // 2,), F32),
        (_name(T.ROPE_FACTORS_SHORT, "weight"), (head_dim // 2,), F32),
    ]
    return layout


def parameter_count(spec: SynthSpec) -> int:
    return sum(math.prod(shape) for _, shape, _ in tensor_layout(spec))


def _vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: unk/bos/eos, 256 byte tokens, pieces, Phi-3 specials."""
    if size < MIN_VOCAB:
        raise InputError(f"vocab: {size} is too small for a llama vocabulary; use at least {MIN_VOCAB}")
    TT = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TT.UNKNOWN, TT.CONTROL, TT.CONTROL] + [TT.BYTE] * 256
    n_pieces = size - len(tokens) - len(SPECIAL_TOKENS)
    alphabet = "etaoinshrdlucmfwypvbgkqjxz"
    pieces: list[str] = []
    for first in "▁" + alphabet:
        for second in [""] + list(alphabet):
            piece = first + second
            if piece != "▁" or not pieces:
                pieces.append(piece)
    pieces += [c for c in "ETAOINSHRDLUCMFWYPVBGKQJXZ0123456789.,!?'\"-:;()"]
    while len(pieces) < n_pieces:
        pieces.append("▁" + "".join(alphabet[(len(pieces) * k) % 26] for k in range(1, 4)) + str(len(pieces)))
    tokens += pieces[:n_pieces]
    types += [TT.NORMAL] * n_pieces
    tokens += list(SPECIAL_TOKENS)
    types += [TT.CONTROL] * len(SPECIAL_TOKENS)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(n_pieces)] + [0.0] * len(SPECIAL_TOKENS)
    return tokens, scores, [int(t) for t in types]


CHUNK_ELEMENTS = 16 * 2**20  # float32 values made at once: 64 MiB, whatever the tensor's size


def _tensor_chunks(rng: np.random.Generator, name: str, shape: tuple[int, ...],
                   dtype: gguf.GGMLQuantizationType) -> Iterator[np.ndarray]:
    """The tensor's data in row-major pieces of at most CHUNK_ELEMENTS values, drawn from `rng` in order, so
    the bytes are the same as drawing the whole tensor at once, in bounded memory."""
    out_type = np.float16 if dtype == gguf.GGMLQuantizationType.F16 else np.float32
    if name.startswith("rope_factors"):
        yield np.linspace(1.0, 1.5, num=shape[0], dtype=np.float32).astype(out_type)
        return
    total = math.prod(shape)
    for start in range(0, total, CHUNK_ELEMENTS):
        draw = rng.standard_normal(min(CHUNK_ELEMENTS, total - start), dtype=np.float32)
        if name.endswith("_norm.weight"):
            data = 1.0 + 0.05 * draw
        elif name.endswith(".bias"):
            data = 0.01 * draw
        else:
            data = 0.02 * draw
        yield data.astype(out_type)


def write_tiny_phimoe(out: Path, spec: SynthSpec = SynthSpec(), name: str = "tiny-phimoe") -> Path:
    """Write the synthetic model to `out` whole or not at all; return the path."""
    out = Path(out)
    _check(spec)
    tokens, scores, types = _vocab(spec.vocab)
    head_dim = spec.embd // spec.heads
    scale = CONTEXT_LENGTH / ORIGINAL_CONTEXT_LENGTH
    attn_factor = math.sqrt(1 + math.log(scale) / math.log(ORIGINAL_CONTEXT_LENGTH))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), ARCH)
    try:
        writer.add_name(name)
        writer.add_license("mit")
        writer.add_description("synthetic phimoe model made by moeq synth; random weights, " +
                               ", ".join(f"{k}={v}" for k, v in asdict(spec).items()))
        writer.add_context_length(CONTEXT_LENGTH)
        writer.add_rope_scaling_orig_ctx_len(ORIGINAL_CONTEXT_LENGTH)
        writer.add_embedding_length(spec.embd)
        writer.add_feed_forward_length(spec.ff)
        writer.add_block_count(spec.layers)
        writer.add_head_count(spec.heads)
        writer.add_head_count_kv(spec.kv_heads)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(ROPE_FREQ_BASE)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        writer.add_rope_scaling_attn_factors(attn_factor)
        writer.add_expert_used_count(spec.experts_used)
        writer.add_expert_count(spec.experts)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(tokens.index("<|endoftext|>"))
        writer.add_unk_token_id(0)
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(PHI35_CHAT_TEMPLATE)

        layout = tensor_layout(spec)
        for tensor_name, shape, dtype in layout:
            np_type = np.dtype(np.float16 if dtype == gguf.GGMLQuantizationType.F16 else np.float32)
            writer.add_tensor_info(tensor_name, tuple(reversed(shape)), np_type, math.prod(shape) * np_type.itemsize,
                                   raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, layout, np.random.default_rng(spec.seed))
        writer.close()
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, out)
    except BaseException as exc:
        writer.close()
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # numpy's tofile says only "N requested and M written": name the file
            exc.filename = exc.filename or str(out)
        raise
    return out


def _write_tensors(writer: gguf.GGUFWriter, layout, rng: np.random.Generator) -> None:
    """Each tensor's data in pieces, padded as GGUFWriter.write_tensor_data pads a whole tensor (gguf-py
    takes only whole arrays; a real-dimension expert tensor is 840 MB in F16)."""
    fout = writer.fout[0]
    for name, shape, dtype in layout:
        info = writer.tensors[0].pop(name)
        writer.write_padding(fout, fout.tell())
        for chunk in _tensor_chunks(rng, name, shape, dtype):
            chunk.tofile(fout)
        writer.write_padding(fout, info.nbytes)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS


# Real models' dimensions; a preset with fewer layers has every tensor at its real size.
PRESETS = {
    "phi-3.5-moe": SynthSpec(layers=32, experts=16, experts_used=2, embd=4096, ff=6400, heads=32, kv_heads=8,
                             vocab=32064),
}


def synth_spec(preset: str | None = None, **options: int | None) -> SynthSpec:
    """A preset's dimensions (or the tiny defaults), with each option that is not None in place of its own."""
    if preset is not None and preset not in PRESETS:
        raise InputError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else SynthSpec()
    return replace(base, **{k: v for k, v in options.items() if v is not None})


def _check(spec: SynthSpec) -> None:
    problems = []
    if spec.embd % 256 or spec.ff % 256:
        problems.append("embd and ff must be multiples of 256 so K-quants apply")
    if spec.embd % spec.heads or spec.heads % spec.kv_heads:
        problems.append("embd must divide by heads, and heads by kv_heads")
    if (spec.embd // spec.heads) % 2:
        problems.append("head size (embd / heads) must be even for rope")
    if spec.experts_used > spec.experts:
        problems.append("experts_used must not exceed experts")
    if problems:
        raise InputError(f"synth options: {'; '.join(problems)}")

"""Tiny but faithful MoE models of llama.cpp's architectures, for demos, tests and benchmarks.

Each file has the tensor names, shapes, dtypes and metadata keys that llama.cpp's converter writes for
a real model of its architecture, scaled down:

- phimoe (microsoft/Phi-3.5-MoE-instruct): biases, output bias, router, 3-D expert tensors, longrope
  factor tensors and the Phi-3.5 chat template;
- qwen3moe (Qwen3-30B-A3B): q/k norms, no biases, a head size twice embd / heads as in the real model;
- llama with experts (Mixtral-8x7B): 8 experts, no biases;
- qwen2moe (Qwen1.5-MoE-A2.7B): q/k/v biases, and a shared expert (`*_shexp`, four times the expert
  width) with its own gate.

Which tensors and keys each has is the one table of per-architecture knowledge in moeq (ARCHS): gguf-py's
tables list every tensor an architecture *may* have, not which of them a real model has, nor their shapes
or the keys llama.cpp's loader asks for. Every name is checked against gguf-py's table. All share a
llama/SentencePiece vocabulary with byte tokens. Weights are seeded random numbers, so the same options
always give the same bytes.

    write_synth_model(Path("tiny.gguf"), SynthSpec(layers=2), arch="qwen3moe")
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np

from moeq.config import SYNTH_MAX, SynthSpec
from moeq.errors import InputError
from moeq.workspace import require_free

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


@dataclass(frozen=True)
class ArchShape:
    """What a real model of one architecture holds, beyond gguf-py's list of the tensors it may have."""

    arch: str  # gguf-py's architecture name
    layer: tuple[T, ...]  # each block's tensors, in the converter's order
    tail: tuple[T, ...]  # after the blocks (token_embd comes first in every one)
    biases: frozenset = frozenset()  # tensors that also have a .bias
    context_length: int = 32768
    rope_freq_base: float = 1_000_000.0
    head_dim_factor: int = 1  # head size = factor x embd / heads (Qwen3-30B-A3B: 128 = 2 x 2048 / 32)
    shared_ff_factor: int = 0  # a shared expert this many times the expert width (0: none)
    longrope: bool = False  # Phi-3.5's: rope scaling keys and the Phi-3.5 chat template
    expert_ff_key: bool = False  # writes <arch>.expert_feed_forward_length (Qwen's converters do)
    vocab_size_key: bool = False  # writes <arch>.vocab_size (llama's converter does)


_EXPERTS = (T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP)
_ATTN = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT)
ARCHS = {
    "phimoe": ArchShape("phimoe", (*_ATTN, T.FFN_NORM, *_EXPERTS),
                        (T.OUTPUT_NORM, T.OUTPUT, T.ROPE_FACTORS_LONG, T.ROPE_FACTORS_SHORT),
                        biases=frozenset({*_ATTN, T.FFN_NORM, T.OUTPUT_NORM, T.OUTPUT}),
                        context_length=CONTEXT_LENGTH, rope_freq_base=ROPE_FREQ_BASE, longrope=True),
    "qwen3moe": ArchShape("qwen3moe", (*_ATTN, T.ATTN_Q_NORM, T.ATTN_K_NORM, T.FFN_NORM, *_EXPERTS),
                          (T.OUTPUT_NORM, T.OUTPUT), context_length=40960, head_dim_factor=2, expert_ff_key=True),
    "llama-moe": ArchShape("llama", (*_ATTN, T.FFN_NORM, *_EXPERTS), (T.OUTPUT_NORM, T.OUTPUT), vocab_size_key=True),
    "qwen2moe": ArchShape("qwen2moe", (*_ATTN, T.FFN_NORM, *_EXPERTS, T.FFN_GATE_INP_SHEXP, T.FFN_GATE_SHEXP,
                                       T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP), (T.OUTPUT_NORM, T.OUTPUT),
                          biases=frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V}), shared_ff_factor=4, expert_ff_key=True),
}
# The tiny model of each (SynthSpec defaults where not given): Mixtral's and Qwen3's 8 experts bring in
# llama.cpp's 8-expert quantization recipe.
TINY = {"phimoe": SynthSpec(), "qwen3moe": SynthSpec(experts=8), "llama-moe": SynthSpec(experts=8),
        "qwen2moe": SynthSpec(experts=4)}


def arch_shape(arch: str) -> ArchShape:
    if arch not in ARCHS:
        raise InputError(f"synth architecture {arch!r}", "not one moeq makes", f"use one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def _name(tensor: gguf.MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + "." + suffix


def head_dim(spec: SynthSpec, arch: str = "phimoe") -> int:
    return arch_shape(arch).head_dim_factor * spec.embd // spec.heads


def _shape(tensor: T, spec: SynthSpec, shape: ArchShape) -> tuple[int, ...]:
    """The ggml shape (ne0 first) llama.cpp's loader asks for."""
    hd = shape.head_dim_factor * spec.embd // spec.heads
    q, kv, shared = spec.heads * hd, spec.kv_heads * hd, shape.shared_ff_factor * spec.ff
    return {
        T.TOKEN_EMBD: (spec.embd, spec.vocab), T.OUTPUT: (spec.embd, spec.vocab), T.OUTPUT_NORM: (spec.embd,),
        T.ROPE_FACTORS_LONG: (hd // 2,), T.ROPE_FACTORS_SHORT: (hd // 2,),
        T.ATTN_NORM: (spec.embd,), T.ATTN_Q: (spec.embd, q), T.ATTN_K: (spec.embd, kv), T.ATTN_V: (spec.embd, kv),
        T.ATTN_OUT: (q, spec.embd), T.ATTN_Q_NORM: (hd,), T.ATTN_K_NORM: (hd,), T.FFN_NORM: (spec.embd,),
        T.FFN_GATE_INP: (spec.embd, spec.experts),
        T.FFN_GATE_EXP: (spec.embd, spec.ff, spec.experts), T.FFN_UP_EXP: (spec.embd, spec.ff, spec.experts),
        T.FFN_DOWN_EXP: (spec.ff, spec.embd, spec.experts),
        T.FFN_GATE_INP_SHEXP: (spec.embd,), T.FFN_GATE_SHEXP: (spec.embd, shared), T.FFN_UP_SHEXP: (spec.embd, shared),
        T.FFN_DOWN_SHEXP: (shared, spec.embd),
    }[tensor]


def tensor_layout(spec: SynthSpec,
                  arch: str = "phimoe") -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]]:
    """(name, ggml shape, dtype) of every tensor, in the converter's order."""
    F16, F32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    shape = arch_shape(arch)
    allowed = gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == shape.arch)]

    def entries(tensor: T, bid: int | None) -> list:
        assert tensor in allowed, f"{tensor.name} is not a tensor of {shape.arch} in gguf-py"
        dims = _shape(tensor, spec, shape)
        router = tensor in (T.FFN_GATE_INP, T.FFN_GATE_INP_SHEXP)
        out = [(_name(tensor, "weight", bid), dims, F32 if len(dims) == 1 or router else F16)]
        if tensor in shape.biases:
            out.append((_name(tensor, "bias", bid), (dims[1] if len(dims) > 1 else dims[0],), F32))
        return out

    layout = entries(T.TOKEN_EMBD, None)
    for i in range(spec.layers):
        layout += [e for tensor in shape.layer for e in entries(tensor, i)]
    layout += [e for tensor in shape.tail for e in entries(tensor, None)]
    return layout


def parameter_count(spec: SynthSpec, arch: str = "phimoe") -> int:
    return sum(math.prod(shape) for _, shape, _ in tensor_layout(spec, arch))


def _vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: unk/bos/eos, 256 byte tokens, pieces, Phi-3 specials."""
    if size < MIN_VOCAB:
        raise InputError("vocab", f"{size} is too small for a llama vocabulary", f"use at least {MIN_VOCAB}")
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


def write_synth_model(out: Path, spec: SynthSpec = SynthSpec(), arch: str = "phimoe",
                      name: str = "tiny-phimoe") -> Path:
    """Write the synthetic model of `arch` (a key of ARCHS) to `out` whole or not at all; return the path."""
    out = Path(out)
    shape = arch_shape(arch)
    check_spec(spec)
    tokens, scores, types = _vocab(spec.vocab)
    hd = head_dim(spec, arch)
    layout = tensor_layout(spec, arch)

    out.parent.mkdir(parents=True, exist_ok=True)
    require_free(out.parent, 2 * parameter_count(spec, arch) + 64 * spec.vocab, f"the synthetic model {out.name}")
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), shape.arch)
    try:
        writer.add_name(name)
        writer.add_license("mit")
        writer.add_description(f"synthetic {shape.arch} model made by moeq synth; random weights, " +
                               ", ".join(f"{k}={v}" for k, v in asdict(spec).items()))
        writer.add_context_length(shape.context_length)
        if shape.longrope:
            writer.add_rope_scaling_orig_ctx_len(ORIGINAL_CONTEXT_LENGTH)
        writer.add_embedding_length(spec.embd)
        writer.add_feed_forward_length(spec.ff)
        writer.add_block_count(spec.layers)
        writer.add_head_count(spec.heads)
        writer.add_head_count_kv(spec.kv_heads)
        writer.add_layer_norm_rms_eps(RMS_EPS)
        writer.add_rope_dimension_count(hd)
        writer.add_rope_freq_base(shape.rope_freq_base)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        if shape.longrope:
            scale = CONTEXT_LENGTH / ORIGINAL_CONTEXT_LENGTH
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(ORIGINAL_CONTEXT_LENGTH)))
        writer.add_expert_used_count(spec.experts_used)
        writer.add_expert_count(spec.experts)
        if shape.expert_ff_key:
            writer.add_expert_feed_forward_length(spec.ff)
        if shape.head_dim_factor != 1:
            writer.add_key_length(hd)
            writer.add_value_length(hd)
        if shape.shared_ff_factor:
            writer.add_expert_shared_feed_forward_length(shape.shared_ff_factor * spec.ff)
        if shape.vocab_size_key:
            writer.add_vocab_size(spec.vocab)
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
        if shape.longrope:
            writer.add_chat_template(PHI35_CHAT_TEMPLATE)

        for tensor_name, dims, dtype in layout:
            np_type = np.dtype(np.float16 if dtype == gguf.GGMLQuantizationType.F16 else np.float32)
            writer.add_tensor_info(tensor_name, tuple(reversed(dims)), np_type, math.prod(dims) * np_type.itemsize,
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


# Real models' dimensions (architecture, spec); a preset with fewer layers has every tensor at its real size.
PRESETS = {
    "phi-3.5-moe": ("phimoe", SynthSpec(layers=32, experts=16, experts_used=2, embd=4096, ff=6400, heads=32,
                                        kv_heads=8, vocab=32064)),
    "qwen3-30b-a3b": ("qwen3moe", SynthSpec(layers=48, experts=128, experts_used=8, embd=2048, ff=768, heads=32,
                                            kv_heads=4, vocab=151936)),
    "mixtral-8x7b": ("llama-moe", SynthSpec(layers=32, experts=8, experts_used=2, embd=4096, ff=14336, heads=32,
                                            kv_heads=8, vocab=32000)),
}


def synth_spec(preset: str | None = None, arch: str = "phimoe", **options: int | None) -> tuple[str, SynthSpec]:
    """(architecture, dimensions): a preset's (or the architecture's tiny model), with each option that is not None
    in place of its own."""
    if preset is not None and preset not in PRESETS:
        raise InputError(f"--preset {preset!r}", "not a preset", f"use one of {', '.join(PRESETS)}")
    if preset:
        arch, base = PRESETS[preset]
    else:
        arch_shape(arch)  # an unknown one is refused
        base = TINY[arch]
    return arch, replace(base, **{k: v for k, v in options.items() if v is not None})


def check_spec(spec: SynthSpec) -> None:
    """Refuse dimensions out of range (SYNTH_MAX) or that llama.cpp cannot run."""
    for key, value in asdict(spec).items():
        low, high = (0, 2**32 - 1) if key == "seed" else (1, SYNTH_MAX[key])
        if not low <= value <= high:
            raise InputError(f"synth option {key} = {value}", "out of range", f"use {low} to {high:,}")
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
        raise InputError("synth options", ", ".join(problems), "change them (moeq synth --help lists them)")

"""A peer file is compared with moeq's own only when its header says it is the same model as the F16: the
architecture and its every hyperparameter, the vocabulary and every tensor's name and shape; the first difference
is named, with what the other file holds shown bounded and in ASCII (moeq/compare/identity.py)."""

from __future__ import annotations

import subprocess
from dataclasses import replace

import gguf
import pytest

from moeq.compare.identity import first_difference
from moeq.config import SynthSpec
from moeq.gguf_header import read_header
from moeq.synth import write_synth_model


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    return write_synth_model(tmp_path_factory.mktemp("f16") / "model-F16.gguf", SynthSpec())


def test_a_quantization_of_the_same_f16_is_the_same_model(f16, tmp_path, toolchain):
    """llama-quantize changes the types and writes general.file_type and the quantization keys: nothing else."""
    peer = tmp_path / "peer-Q4_K_M.gguf"
    proc = subprocess.run([str(toolchain.path("llama-quantize")), str(f16), str(peer), "Q4_K_M"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_header(peer).metadata["general.file_type"] == 15
    assert first_difference(read_header(f16), read_header(peer)) is None
    assert first_difference(read_header(f16), read_header(f16)) is None


@pytest.mark.parametrize("spec,arch,difference", [
    (SynthSpec(ff=1024), "phimoe", "phimoe.feed_forward_length is 1024, where the F16's is 512"),
    (SynthSpec(experts=8), "phimoe", "phimoe.expert_count is 8, where the F16's is 4"),
    (SynthSpec(layers=3), "phimoe", "phimoe.block_count is 3, where the F16's is 2"),
    (SynthSpec(vocab=768), "phimoe", "tokenizer.ggml.tokens is an array of 768 items, where the F16's is an array of 512 items"),
    (SynthSpec(), "qwen3moe", "general.architecture is 'qwen3moe', where the F16's is 'phimoe'"),
])
def test_another_model_is_refused_by_its_first_difference(f16, tmp_path, spec, arch, difference):
    other = write_synth_model(tmp_path / "other.gguf", spec, arch)
    assert difference in first_difference(read_header(f16), read_header(other))


def test_the_same_count_of_other_tokens_is_another_vocabulary(f16, tmp_path):
    """Equal counts are not enough: the token list is compared by its items' digest."""
    reader = gguf.GGUFReader(f16)
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in reader.fields["tokenizer.ggml.tokens"].data]
    arch = "phimoe"
    writer = gguf.GGUFWriter(tmp_path / "renamed.gguf", arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name == "tokenizer.ggml.tokens":
            writer.add_token_list([tokens[0] + "x", *tokens[1:]])
            continue
        value = field.contents()
        writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1
                             else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=list(reversed(tensor.shape.tolist())),
                          raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert first_difference(read_header(f16), read_header(tmp_path / "renamed.gguf")) == \
        "tokenizer.ggml.tokens holds other items than the F16's (512 of them)"


def test_a_tensor_of_another_shape_or_a_missing_or_extra_tensor_is_named(f16):
    header = read_header(f16)
    down = next(i for i, t in enumerate(header.tensors) if t.name == "blk.1.ffn_down_exps.weight")
    tensors = list(header.tensors)
    tensors[down] = replace(tensors[down], shape=[512, 256, 8])
    assert first_difference(header, replace(header, tensors=tensors)) == \
        "'blk.1.ffn_down_exps.weight' is [512, 256, 8], where the F16's is [512, 256, 4]"
    assert first_difference(header, replace(header, tensors=header.tensors[:-1])) == \
        f"no tensor {header.tensors[-1].name!r}, which the F16 has"
    assert first_difference(replace(header, tensors=header.tensors[:-1]), header) == \
        f"a tensor {header.tensors[-1].name!r} the F16 does not have"


def test_what_the_other_file_says_is_shown_bounded_and_in_ascii(f16):
    header = read_header(f16)
    hostile = replace(header, metadata={**header.metadata, "general.architecture": "phimoe\u202e" + "x" * 500})
    text = first_difference(header, hostile)
    assert "\\u202e" in text and len(text) < 160 and text.isascii()
    renamed = replace(header, tensors=[replace(header.tensors[0], name="\x1b[31m" + "y" * 300), *header.tensors[1:]])
    text = first_difference(header, renamed)
    assert text.startswith("no tensor ") and "\\x1b" in first_difference(
        header, replace(header, tensors=[*header.tensors, replace(header.tensors[0], name="\x1b[2J")]))
    assert text.isascii() and len(text) < 160

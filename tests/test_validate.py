"""`moeq validate` on real quants of the tiny model, and on damaged files."""

from __future__ import annotations

import json
import struct
import subprocess

import pytest

from moeq.config import SynthSpec
from moeq.gguf_header import read_header
from moeq.synth import write_tiny_phimoe

from conftest import run_moeq


@pytest.fixture(scope="module")
def quants(tmp_path_factory, tiny_model, toolchain):
    tmp = tmp_path_factory.mktemp("validate")
    out = {}
    for qtype in ("Q8_0", "Q4_K_M", "Q2_K"):
        out[qtype] = tmp / f"{qtype}.gguf"
        subprocess.run([str(toolchain.path("llama-quantize")), str(tiny_model), str(out[qtype]), qtype],
                       check=True, capture_output=True)
    return out


def validate(path, *args):
    proc = run_moeq("validate", str(path), "--json", *args)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip() else None)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "Q2_K"])
def test_real_quants_pass_every_check(quants, tiny_model, qtype):
    proc, report = validate(quants[qtype], "--against", str(tiny_model), "--numerics", "full")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c["name"] for c in report["checks"]] == ["container", "model", "tensors", "metadata", "numerics"]
    assert report["worst_tensors"][0]["rel_rmse"] > 0


def check_of(report, name):
    return next(c for c in report["checks"] if c["name"] == name)


@pytest.mark.parametrize("content,detail", [
    (b"", "zero-byte file"),
    (bytes(range(256)) * 4, "not a GGUF file"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "not a GGUF file (starts with b'\\x89PNG')"),
    (b"GGUF\x07\0\0\0" + b"\0" * 64, "GGUF version 7 is not supported"),
])
def test_not_a_model(tmp_path, content, detail):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    proc, report = validate(path)
    assert proc.returncode == 7
    assert check_of(report, "container")["ok"] is False
    assert detail in check_of(report, "container")["detail"]
    assert proc.stderr == f"error: {path}: failed container\n"


def test_truncated(quants, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(quants["Q8_0"].read_bytes()[:-4096])
    proc, report = validate(cut)
    assert proc.returncode == 7 and "the file is truncated" in check_of(report, "container")["detail"]


def test_wrong_architecture(quants):
    proc, report = validate(quants["Q8_0"], "--arch", "llama")
    assert proc.returncode == 7
    assert check_of(report, "model")["detail"] == "architecture is 'phimoe', expected 'llama'"


def test_changed_shape_against_source(quants, tmp_path):
    other = write_tiny_phimoe(tmp_path / "other.gguf", SynthSpec(vocab=600))
    proc, report = validate(quants["Q8_0"], "--against", str(other))
    assert proc.returncode == 7
    assert check_of(report, "tensors")["detail"] == ("shape output.bias [512] != [600], output.weight [256, 512] "
                                                     "!= [256, 600], token_embd.weight [256, 512] != [256, 600]")


def test_nan_tensor(quants, tiny_model, tmp_path):
    poisoned = tmp_path / "nan.gguf"
    data = bytearray(quants["Q8_0"].read_bytes())
    header = read_header(quants["Q8_0"])
    target = next(t for t in header.tensors if t.name == "blk.0.ffn_up_exps.weight")
    struct.pack_into("<H", data, header.data_offset + target.offset, 0x7E00)  # f16 NaN as a block scale
    poisoned.write_bytes(bytes(data))
    proc, report = validate(poisoned, "--against", str(tiny_model))
    assert proc.returncode == 7
    assert check_of(report, "numerics")["detail"].startswith("blk.0.ffn_up_exps.weight: NaN or Inf after dequantizing")


def test_missing_file_and_bad_option(tmp_path):
    proc = run_moeq("validate", str(tmp_path / "none.gguf"))
    assert proc.returncode == 3 and proc.stderr == f"error: {tmp_path / 'none.gguf'}: no such file; pass the path of a GGUF model\n"
    proc = run_moeq("validate", str(tmp_path / "none.gguf"), "--numerics", "most")
    assert proc.returncode == 3 and proc.stderr == "error: --numerics 'most': use sample, full or off\n"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M", "Q2_K"])
def test_type_mix_follows_the_recipe(quants, qtype):
    proc, report = validate(quants[qtype], "--quant", qtype, "--numerics", "off")
    assert proc.returncode == 0, proc.stdout
    assert check_of(report, "type mix")["detail"].startswith(f"file_type {({'Q8_0': 7, 'Q4_K_M': 15, 'Q2_K': 10})[qtype]}")


def test_file_type_that_lies(quants, tmp_path):
    """general.file_type rewritten to say Q4_K_M over Q8_0 tensors."""
    data = bytearray(quants["Q8_0"].read_bytes())
    key = b"general.file_type"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # uint32 value type
    struct.pack_into("<I", data, at + 4, 15)
    liar = tmp_path / "liar.gguf"
    liar.write_bytes(bytes(data))
    proc, report = validate(liar, "--quant", "Q4_K_M")
    assert proc.returncode == 7
    assert "is Q8_0, the Q4_K_M recipe gives Q4_K" in check_of(report, "type mix")["detail"]
    proc, report = validate(liar, "--quant", "Q8_0")
    assert check_of(report, "type mix")["detail"].startswith("general.file_type is 15, Q8_0 is 7")

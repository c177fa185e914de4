"""`moeq validate` on real quants of the tiny model, and on damaged files."""

from __future__ import annotations

import json
import struct
import subprocess

import pytest

from moeq.config import SynthSpec
from moeq.gguf_header import read_header
from moeq.synth import write_synth_model

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
    assert [c["name"] for c in report["checks"]] == ["container", "model", "tensors", "metadata", "chat template",
                                                     "numerics"]
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
    assert proc.stderr == f"error: {path}: failed container; the table above says why\n"


def test_truncated(quants, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(quants["Q8_0"].read_bytes()[:-4096])
    proc, report = validate(cut)
    assert proc.returncode == 7 and "the file is truncated" in check_of(report, "container")["detail"]


def test_wrong_architecture(quants, tmp_path):
    proc, report = validate(quants["Q8_0"], "--arch", "llama")
    assert proc.returncode == 7
    assert check_of(report, "model")["detail"] == "architecture is 'phimoe', expected 'llama'"
    # Without --arch the expected architecture is the source's.
    import gguf
    import numpy as np
    alien = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(alien), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 256), dtype=np.float16))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    proc, report = validate(quants["Q8_0"], "--against", str(alien), "--numerics", "off")
    assert check_of(report, "model")["detail"] == "architecture is 'phimoe', expected 'llama'"


def test_changed_shape_against_source(quants, tmp_path):
    other = write_synth_model(tmp_path / "other.gguf", SynthSpec(vocab=600))
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
    assert proc.returncode == 3 and proc.stderr == "error: --numerics 'most': not a numerics setting; use sample, full or off\n"


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


def test_metadata_of_the_source_is_carried_over(quants, tiny_model, tmp_path):
    """Every key the source has must reach the quant unchanged; only the quantization keys are new."""
    data = bytearray(quants["Q8_0"].read_bytes())
    at = data.index(b"general.license") + len(b"general.license")
    assert data[at + 12:at + 15] == b"mit"  # type (4 bytes), length (8), then the string
    data[at + 12:at + 15] = b"gpl"
    edited = tmp_path / "edited.gguf"
    edited.write_bytes(bytes(data))
    proc, report = validate(edited, "--against", str(tiny_model), "--numerics", "off")
    assert proc.returncode == 7
    assert check_of(report, "metadata")["detail"] == "changed from the source: general.license"
    proc, report = validate(quants["Q8_0"], "--against", str(tiny_model), "--numerics", "off")
    assert proc.returncode == 0
    assert check_of(report, "metadata")["detail"].endswith("other keys carried over unchanged")


def test_a_chat_template_changed_on_the_way_fails_the_chat_template_check(quants, tiny_model, tmp_path, toolchain):
    """The source's template reaches every quant (the example phimoe carries Phi-3.5's); a quant made with another
    (llama-quantize --override-kv, as a wrong converter or a hand edit would) fails, naming both sha256."""
    proc, report = validate(quants["Q4_K_M"], "--against", str(tiny_model), "--numerics", "off")
    assert proc.returncode == 0
    assert check_of(report, "chat template")["detail"].startswith("the source's (407 characters, sha256 ")
    other = tmp_path / "other-template.gguf"
    subprocess.run([str(toolchain.path("llama-quantize")), "--override-kv",
                    "tokenizer.chat_template=str:{{ messages[0].content }}", str(tiny_model), str(other), "Q8_0"],
                   check=True, capture_output=True)
    proc, report = validate(other, "--against", str(tiny_model), "--numerics", "off")
    assert proc.returncode == 7
    assert check_of(report, "chat template")["detail"].startswith("differs from the source's (sha256 ")
    assert not check_of(report, "chat template")["ok"]


@pytest.mark.parametrize("template,rendered,why_not", [
    ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]"
     "{% endif %}", "[system] You are a helpful assistant.\n[user] Which file should I download?\n[assistant]", None),
    ("{{ bos_token }}{{ messages[1].content }}{{ eos_token }}", "<s>Which file should I download?</s>", None),
    ("{{ raise_exception('only user and assistant roles are supported') }}", None,
     "the template does not render (TemplateError: only user and assistant roles are supported)"),
    ("{{ ''.__class__.__mro__ }}", None, "the template does not render (SecurityError: "),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", None,
     "rendering it took over 5 s"),
    ("x" * 70000, None, "the template has 70,000 characters, more than moeq renders (65,536)"),
    ("{% for i in range(20000) %}abc{% endfor %}", None, "it renders to more than 16,384 characters"),
])
def test_a_chat_template_is_rendered_in_a_sandbox_bounded_in_size_and_time(template, rendered, why_not):
    """The template comes from the file: untrusted. Jinja's immutable sandbox (no attribute escapes), and a child
    process stopped after 5 s (a sandbox does not bound loops)."""
    from moeq.validate.prompt import render_example

    text, why = render_example(template, "<s>", "</s>")
    assert text == rendered
    assert (why or "").startswith(why_not) if why_not else why is None


def test_missing_tensor_and_offset_past_end(quants, tmp_path, tiny_model):
    more = write_synth_model(tmp_path / "3-layers.gguf", SynthSpec(layers=3))
    proc, report = validate(quants["Q8_0"], "--against", str(more))
    assert proc.returncode == 7
    assert "block_count: 2 != source 3" in check_of(report, "model")["detail"]
    assert check_of(report, "tensors")["detail"].startswith("missing blk.2.attn_k.bias, blk.2.attn_k.weight")
    # A tensor whose offset points past the end of the file.
    data = bytearray(quants["Q8_0"].read_bytes())
    header = read_header(quants["Q8_0"])
    last = header.tensors[-1]
    name = last.name.encode()
    at = data.index(name, 0, header.data_offset) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, offset_at, len(data) * 2 // 32 * 32)
    broken = tmp_path / "offset.gguf"
    broken.write_bytes(bytes(data))
    proc, report = validate(broken)
    assert proc.returncode == 7
    assert f"tensor {last.name} ends at byte" in check_of(report, "container")["detail"]


def test_corrupted_header_bytes_always_give_a_clean_result(quants, tmp_path):
    """Bounded fuzz: any header byte changed gives a report (pass or a failing check), never a crash."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from moeq.validate.checks import validate_file

    original = quants["Q2_K"].read_bytes()
    header_end = read_header(quants["Q2_K"]).data_offset

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=4))
    def corrupt(edits):
        data = bytearray(original)
        for position, value in edits:
            data[position] = value
        path = tmp_path / "fuzz.gguf"
        path.write_bytes(bytes(data))
        report = validate_file(path, numerics="off")
        assert report.checks, "no check ran"
        for check in report.checks:
            assert check.ok or check.detail.strip(), check

    corrupt()


def test_ladder_mode_writes_a_validate_record(tmp_path, toolchain):
    from test_quantize import write_config

    cfg = write_config(tmp_path, extra_quant=", tensor_types: {attn_v: q8_0}")
    # No file yet: the validate command's plan makes it first (the steps validation needs), then validates it.
    proc = run_moeq("validate", "--config", str(cfg), "--quant", "Q4_K_M", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from moeq.record_store import load_record
    from moeq.records import ValidateRecord, record_json

    path = tmp_path / "ws" / "records" / "validate-Q4_K_M.json"
    saved = json.loads(path.read_text())
    assert saved["schema_version"] == 2 and saved["key"]["numerics"] == "sample"
    saved = saved["record"]
    assert record_json(load_record(path, ValidateRecord)) == json.loads(proc.stdout)  # paths in the file: workspace-relative
    assert saved["file"]["path"] == "quants/tiny-phimoe-Q4_K_M.gguf"
    assert saved["ok"] is True and saved["stage"] == "validate"
    assert [c["name"] for c in saved["checks"]] == ["container", "model", "tensors", "type mix", "metadata",
                                                    "chat template", "numerics"]
    assert saved["plan"]["n_layer"] == 2 and [w["mode"] for w in saved["plan"]["weights"]] == ["gpu", "ncmoe 1", "cpu-moe"]


def test_ladder_mode_skips_a_current_record_unless_forced(tmp_path, toolchain):
    from test_quantize import write_config

    cfg = write_config(tmp_path)
    assert run_moeq("quantize", "--config", str(cfg), "--quant", "Q8_0").returncode == 0
    record = tmp_path / "ws" / "records" / "validate-Q8_0.json"
    assert run_moeq("validate", "--config", str(cfg), "--quant", "Q8_0").returncode == 0
    written = record.stat().st_mtime_ns
    proc = run_moeq("validate", "--config", str(cfg), "--quant", "Q8_0")
    assert proc.returncode == 0 and "Q8_0: up to date" in proc.stdout
    assert record.stat().st_mtime_ns == written
    proc = run_moeq("validate", "--config", str(cfg), "--quant", "Q8_0", "--force")
    assert proc.returncode == 0 and "up to date" not in proc.stdout
    assert record.stat().st_mtime_ns > written

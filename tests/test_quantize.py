"""The quantize stage on the real llama-quantize and the tiny model."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import gguf
import pytest

from moeq.config import load_pipeline
from moeq.errors import ResourceError
from moeq.record_store import load_record
from moeq.records import QuantizeRecord
from moeq.workspace import Workspace

from conftest import REPO, default_sigint, run_moeq, run_target, tool_folder

Q = gguf.GGMLQuantizationType


def make_counting_bin(tmp_path: Path, toolchain) -> Path:
    """A tool folder whose llama-quantize counts its starts, then runs the real one."""
    return tool_folder(tmp_path / "bin", toolchain, {
        "llama-quantize": f'[ "$1" = --help ] || echo start >> {tmp_path / "starts"}\nexec {{real}} "$@"\n'})


def holding_bin(tmp_path: Path, toolchain) -> tuple[Path, Path]:
    """A tool folder whose llama-quantize, once it has written its output, keeps running while the returned `hold`
    file exists: a quantization caught in the act, however small the model."""
    hold = tmp_path / "hold"
    hold.touch()
    return tool_folder(tmp_path / "bin", toolchain, {"llama-quantize": (
        f'[ "$1" = --help ] && exec {{real}} "$@"\n{{real}} "$@" || exit $?\n'
        f'while [ -f {hold} ]; do sleep 0.05; done\n')}), hold


def starts(tmp_path: Path) -> int:
    """Runs of llama-quantize that quantized something (the toolchain's --help probe excluded)."""
    path = tmp_path / "starts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def write_config(tmp_path: Path, bin_dir: Path | None = None, extra_quant: str = "", source: str = "",
                 synth: str = "{layers: 2, experts: 4, experts_used: 2, embd: 256, ff: 512, vocab: 512}") -> Path:
    src = source or f"  kind: synth\n  synth: {synth}\n"
    text = f"""\
model: {{name: tiny-phimoe, base_model: microsoft/Phi-3.5-MoE-instruct, license: mit, quantized_by: moeq,
        file_stem: tiny-phimoe}}
source:
{src}workspace: {tmp_path / 'ws'}
quants:
  - type: Q8_0
  - {{type: Q4_K_M{extra_quant}}}
  - type: Q2_K
hub: {{namespace: moeq-test}}
"""
    if bin_dir:
        text += f"toolchain: {{llama_cpp_bin: {bin_dir}}}\n"
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, toolchain):
    """The tiny model quantized to the whole ladder once, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("ladder")
    cfg = write_config(tmp, make_counting_bin(tmp, toolchain))
    proc = run_moeq("quantize", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    Ladder = namedtuple("Ladder", "tmp cfg results stderr")
    return Ladder(tmp, cfg, {r["record"]["quant"]: r for r in json.loads(proc.stdout)}, proc.stderr)


def types_of(path: str) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def test_file_types_and_tensor_mix(ladder):
    expected_ftype = {"Q8_0": 7, "Q4_K_M": 15, "Q2_K": 10}
    for quant, result in ladder.results.items():
        record = result["record"]
        reader = gguf.GGUFReader(record["output"]["path"])
        assert reader.fields["general.file_type"].contents() == expected_ftype[quant]
        assert record["file_type"] == expected_ftype[quant]
    q8 = types_of(ladder.results["Q8_0"]["record"]["output"]["path"])
    for name, t in q8.items():
        if name.endswith("ffn_gate_inp.weight") or name.endswith(".bias") or "norm" in name or "rope" in name:
            assert t == Q.F32, name
        else:
            assert t == Q.Q8_0, name
    q4 = types_of(ladder.results["Q4_K_M"]["record"]["output"]["path"])
    quantized = {n: t for n, t in q4.items() if t not in (Q.F32,)}
    assert set(quantized.values()) == {Q.Q4_K, Q.Q6_K}
    assert q4["output.weight"] == Q.Q6_K
    assert q4["blk.1.ffn_down_exps.weight"] == Q.Q6_K and q4["blk.0.ffn_up_exps.weight"] == Q.Q4_K
    q2 = types_of(ladder.results["Q2_K"]["record"]["output"]["path"])
    assert q2["output.weight"] == Q.Q6_K
    assert q2["blk.0.ffn_up_exps.weight"] == Q.Q2_K
    assert q2["blk.0.ffn_down_exps.weight"] == Q.Q3_K
    # attn_v gets Q3_K here; llama.cpp gives it Q4_K only when n_head / n_head_kv >= 4 (the real model).
    assert q2["blk.0.attn_v.weight"] == Q.Q3_K and q2["blk.1.attn_output.weight"] == Q.Q3_K
    assert q2["token_embd.weight"] == Q.Q2_K


def test_record_rows_match_the_file(ladder):
    for result in ladder.results.values():
        record = load_record(Path(ladder.tmp / "ws" / "records" / f"quantize-{result['record']['quant']}.json"), QuantizeRecord)
        assert record is not None
        reader = gguf.GGUFReader(record.output.path)
        assert [(r.name, r.type_after, r.bytes_after, r.shape) for r in record.tensors] == \
               [(t.name, t.tensor_type.name, int(t.n_bytes), [int(x) for x in t.shape]) for t in reader.tensors]
        assert all(r.type_before in ("F16", "F32") for r in record.tensors)
        assert record.output.size == Path(record.output.path).stat().st_size
        assert record.tool.commit == "0c1e570"
        assert record.quant_bpw > 0 and record.model_bpw > 15
        assert record.command[-1] == record.quant and record.command[-2] == record.output.path + ".partial"
        assert Path(result["log"]).read_text().count("converting to") > 0


def test_second_run_skips_and_override_reruns(ladder):
    before = starts(ladder.tmp)
    assert before == 3
    proc = run_moeq("quantize", "--config", str(ladder.cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    assert all(r["skipped"] for r in json.loads(proc.stdout))
    assert starts(ladder.tmp) == before, "llama-quantize was started for an up-to-date quant"
    # Changing one quant's override re-runs only that quant, and the override reaches the file.
    text = ladder.cfg.read_text().replace("{type: Q4_K_M}", "{type: Q4_K_M, tensor_types: {attn_v: q8_0}}")
    ladder.cfg.write_text(text)
    proc = run_moeq("quantize", "--config", str(ladder.cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    skipped = {r["record"]["quant"]: r["skipped"] for r in json.loads(proc.stdout)}
    assert skipped == {"Q8_0": True, "Q4_K_M": False, "Q2_K": True}
    assert starts(ladder.tmp) == before + 1
    q4 = types_of(str(ladder.tmp / "ws" / "quants" / "tiny-phimoe-Q4_K_M.gguf"))
    assert q4["blk.0.attn_v.weight"] == Q.Q8_0
    proc = run_moeq("quantize", "--config", str(ladder.cfg), "--quant", "Q8_0", "--force")
    assert proc.returncode == 0 and starts(ladder.tmp) == before + 2


def test_changed_output_is_redone(ladder):
    out = ladder.tmp / "ws" / "quants" / "tiny-phimoe-Q2_K.gguf"
    with open(out, "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x7f")
    proc = run_moeq("quantize", "--config", str(ladder.cfg), "--quant", "Q2_K", "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)[0]["skipped"] is False


@pytest.mark.slow
def test_interrupt_leaves_nothing_and_next_run_succeeds(tmp_path, toolchain):
    bin_dir, hold = holding_bin(tmp_path, toolchain)
    cfg = write_config(tmp_path, bin_dir)
    final = tmp_path / "ws" / "quants" / "tiny-phimoe-Q2_K.gguf"
    partial = final.with_name(final.name + ".partial")
    proc = subprocess.Popen([sys.executable, "-m", "moeq", "quantize", "--config", str(cfg), "--quant", "Q2_K",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.exists(), "quantization never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    assert not final.exists() and not partial.exists()
    assert not subprocess.run(["pgrep", "-f", str(partial)], capture_output=True).stdout, "llama-quantize survived"
    hold.unlink()
    again = run_moeq("quantize", "--config", str(cfg), "--quant", "Q2_K", "--json")
    assert again.returncode == 0, again.stderr
    assert gguf.GGUFReader(final).fields["general.file_type"].contents() == 10


def start_quantize(cfg: Path, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moeq", "quantize", "--config", str(cfg), "--quant", "Q2_K",
                             "--threads", "1", "--json"], stdout=subprocess.PIPE, stderr=stderr,
                            text=True, cwd=REPO)


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


@pytest.mark.slow
def test_sigterm_stops_cleanly(tmp_path, toolchain):
    cfg = write_config(tmp_path, holding_bin(tmp_path, toolchain)[0])
    final = tmp_path / "ws" / "quants" / "tiny-phimoe-Q2_K.gguf"
    proc = start_quantize(cfg)
    wait_for(final.with_name(final.name + ".partial"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.rstrip().endswith("interrupted by SIGTERM; stopped the running tool and removed its partial output "
                                 "(a download keeps its .partial file); run the command again: a download resumes, "
                                 "a recipe search keeps every measurement it made, any other step starts over")
    assert not final.exists() and not final.with_name(final.name + ".partial").exists()


@pytest.mark.slow
def test_second_writer_waits_for_the_first(tmp_path, toolchain):
    bin_dir, hold = holding_bin(tmp_path, toolchain)
    cfg = write_config(tmp_path, bin_dir)
    final = tmp_path / "ws" / "quants" / "tiny-phimoe-Q2_K.gguf"
    first = start_quantize(cfg)
    wait_for(final.with_name(final.name + ".partial"))
    second_log = tmp_path / "second.log"
    with open(second_log, "w") as log:
        second = start_quantize(cfg, stderr=log)
        deadline = time.monotonic() + 120
        while "waiting for pid" not in second_log.read_text() and second.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        hold.unlink()  # the first finishes only once the second waits for it
        out1, err1 = first.communicate(timeout=300)
        out2, _ = second.communicate(timeout=300)
    err2 = second_log.read_text()
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    assert f"quant-Q2_K: waiting for pid {first.pid} to finish" in err2
    assert json.loads(out1)[0]["skipped"] is False
    assert json.loads(out2)[0]["skipped"] is True  # the second found the first's fresh result


def local_source_config(tmp_path: Path, source_path: Path) -> Path:
    return write_config(tmp_path, source=f"  kind: local\n  path: {source_path}\n")


def test_missing_source(tmp_path, toolchain):
    cfg = local_source_config(tmp_path, tmp_path / "nope.gguf")
    proc = run_moeq("quantize", "--config", str(cfg), "--quant", "Q8_0")
    assert proc.returncode == 3
    assert proc.stderr.splitlines()[-1] + "\n" == f"error: {tmp_path / 'nope.gguf'}: source.path does not exist; fix source.path in {cfg}\n"


def test_non_gguf_source(tmp_path, toolchain):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    proc = run_moeq("quantize", "--config", str(local_source_config(tmp_path, fake)), "--quant", "Q8_0")
    assert proc.returncode == 3
    assert proc.stderr.splitlines()[-1].startswith(f"error: {fake}: not a GGUF file (starts with b'\\x89PNG'); point the source")


def test_already_quantized_source(ladder, tmp_path):
    q8 = Path(ladder.results["Q8_0"]["record"]["output"]["path"])
    cfg = local_source_config(tmp_path, q8)
    proc = run_moeq("quantize", "--config", str(cfg), "--quant", "Q2_K")
    assert proc.returncode == 3
    assert proc.stderr.splitlines()[-1].startswith(f"error: {q8}: already quantized (output.weight is Q8_0); quantize from the F16")
    assert "--allow-requantize" in proc.stderr
    allowed = run_moeq("quantize", "--config", str(cfg), "--quant", "Q2_K", "--allow-requantize")
    assert allowed.returncode == 0, allowed.stderr
    assert "warning:" in allowed.stderr and "severely reduce quality" in allowed.stderr


def test_unknown_type_refused_before_anything_runs(tmp_path):
    cfg = write_config(tmp_path)
    proc = run_moeq("quantize", "--config", str(cfg), "--quant", "Q9_X")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] + "\n" == f"error: {cfg}: quants: no quant 'Q9_X' in the ladder; name one it configures: Q8_0, Q4_K_M, Q2_K\n"
    assert not (tmp_path / "ws").exists()


def test_llama_quantize_failure_quotes_its_log(tmp_path, toolchain):
    """A file that looks like a MoE model to moeq (experts, an expert count) but lacks what llama.cpp's loader needs."""
    bad = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(bad), "qwen3moe")
    writer.add_expert_count(2)
    writer.add_tensor("blk.0.ffn_up_exps.weight", __import__("numpy").zeros((2, 256, 256), dtype="float16"))
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    proc = run_moeq("quantize", "--config", str(local_source_config(tmp_path, bad)), "--quant", "Q8_0")
    assert proc.returncode == 4, proc.stderr
    log = tmp_path / "ws" / "quants" / "tiny-phimoe-Q8_0.gguf.log"
    assert proc.stderr.splitlines()[-1].startswith("error: llama-quantize: exited 1: ")
    assert proc.stderr.rstrip().endswith(f"; full log: {log}")
    assert "qwen3moe" in proc.stderr or "key not found" in proc.stderr
    assert not (tmp_path / "ws" / "quants" / "tiny-phimoe-Q8_0.gguf").exists()
    assert not list((tmp_path / "ws" / "quants").glob("*.partial"))


def test_disk_space_refusal(tmp_path, toolchain, monkeypatch):
    pipeline = load_pipeline(write_config(tmp_path))
    run_target(pipeline, "fetch")  # the source first: making it checks the disk too
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=3 * 2**20))  # a nearly full disk
    with pytest.raises(ResourceError) as info:
        run_target(pipeline, "quantize", "Q8_0")
    assert str(info.value).startswith(f"{pipeline.workspace / 'quants'}: 3.15 MB free, Q8_0 needs about ")
    assert str(info.value).endswith("free some space or move the workspace")
    assert not list((pipeline.workspace / "quants").iterdir())


def test_two_writers_never_overlap(tmp_path, toolchain):
    pipeline = load_pipeline(write_config(tmp_path))
    ws = Workspace(pipeline.workspace)
    with ws.lock("quant-Q8_0"):
        proc = subprocess.run([sys.executable, "-c", (
            "from moeq.workspace import Workspace; import sys\n"
            f"ws = Workspace({str(pipeline.workspace)!r})\n"
            "try:\n    ctx = ws.lock('quant-Q8_0', wait=False); ctx.__enter__()\n"
            "except Exception as e: print(e); sys.exit(6)\n")], capture_output=True, text=True)
    assert proc.returncode == 6
    assert proc.stdout.strip() == f"quant-Q8_0: being written by pid {__import__('os').getpid()}; wait for it or stop it"


def test_one_progress_line_per_run_when_not_a_terminal_and_none_with_json(ladder):
    """(Last in the module: it quantizes again, which the counts of starts above would see.)"""
    assert "llama-quantize" not in ladder.stderr  # --json: nothing but the result
    proc = run_moeq("quantize", "--config", str(ladder.cfg), "--quant", "Q4_K_M", "--force")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "llama-quantize" in line] == [
        "Q4_K_M quantize: llama-quantize: 39 tensors"]

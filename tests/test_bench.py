"""`moeq bench` on the tiny model's real quants: llama-bench, llama-completion and llama-perplexity,
with llama.cpp's RPC backend standing in for a GPU."""

from __future__ import annotations

import hashlib
import re
import time
import json
from pathlib import Path

import pytest

from moeq.kld import parse_perplexity
from moeq.texts import shipped_evaluation
from moeq.record_store import Records
from moeq.records import ChoiceRecord, QuantizeRecord, ValidateRecord
from moeq.cards.facts import card_facts
from moeq.cards.facts.shared import NOISY
from moeq.cards.lint import lint_card
from moeq.cards.render import render_card
from moeq.steps import wiring
from moeq.steps.context import Context
from moeq.manifest import MANIFEST_NAME, read_manifest
from moeq.config import load_pipeline
from moeq.llama_logs import parse_buffer_sizes
from moeq.workspace import Workspace

from conftest import REPO, example_section, link_log_flush, pipeline_file, run_moeq, run_target, tool_folder

LADDER = ("Q8_0", "Q4_K_M", "Q2_K")
EVAL_TEXT_SHA256 = "f08ec0c98a45566f009f3e07dce1e5a0247a9fb8311a3a8dea6ea86bad0612db"


def card_for(pipeline, quant: str):
    """`moeq card --quant QUANT`: the example's one repo, made for this quant."""
    return run_target(pipeline, "card", quant)


def prepared(folder: Path, quants=LADDER, rpc: bool = True):
    bench = {key: value for key, value in example_section("bench").items() if rpc or key != "rpc"}
    config = pipeline_file(folder, bench=bench)
    pipeline = load_pipeline(config)
    ws = Workspace(pipeline.workspace)
    for q in quants:
        run_target(pipeline, "quantize", q)
        run_target(pipeline, "validate", q)
    return config, pipeline, ws


@pytest.fixture(scope="module")
def benched(tmp_path_factory, toolchain, rpc_device):
    config, pipeline, ws = prepared(tmp_path_factory.mktemp("bench"))
    outcomes = {q: run_target(pipeline, "bench", q, rpc=rpc_device) for q in LADDER}
    return config, pipeline, ws, outcomes


def test_eval_text_is_the_shipped_one():
    assert hashlib.sha256(shipped_evaluation().read_bytes()).hexdigest() == EVAL_TEXT_SHA256


@pytest.mark.parametrize("quant", LADDER)
def test_speed_per_mode(benched, quant):
    record = benched[3][quant].record
    assert record.errors == []
    assert [run.mode for run in record.speed] == ["cpu", "gpu", "cpu-moe", "ncmoe 1"]
    assert record.speed[0].backends == "CPU" and record.not_measured == []
    for run in record.speed[1:]:
        assert run.backends == "RPC" and run.gpu_info.startswith("127.0.0.1:")
        assert [t.test for t in run.tests] == ["pp64", "tg16"]
        assert all(t.avg_ts > 0 and len(t.samples_ts) == 2 for t in run.tests)
        assert run.model_n_params == 3_807_808
    assert record.machine.cores >= 1 and record.machine.cpu and record.machine.date
    assert record.tool.commit == "0c1e570"


@pytest.mark.parametrize("quant", LADDER)
def test_offload_moves_the_planned_bytes(benched, quant):
    _, _, ws, outcomes = benched
    record = outcomes[quant].record
    assert [(m.mode, m.ctx) for m in record.memory] == [("gpu", 512), ("cpu-moe", 512), ("ncmoe 1", 512)]
    for m in record.memory:
        assert abs(m.difference_mib["model"]) <= 0.1, m
        assert abs(m.difference_mib["KV"]) <= 0.1, m
        assert m.device_mib["compute"] > 0
        # llama.cpp's memory breakdown at exit (whole MiB) agrees, and names the device.
        [line] = m.breakdown
        assert line.device == "RPC0" and line.description.startswith("127.0.0.1:")
        assert abs(line.mib["model"] - m.device_mib["model"]) < 1 and line.mib["total"] > 0
    by_mode = {m.mode: m.device_mib["model"] for m in record.memory}
    assert by_mode["gpu"] > by_mode["ncmoe 1"] > by_mode["cpu-moe"] > 0
    # The parser on the tool's own output, as this run captured it.
    log = (ws.root / "bench" / quant / "memory-cpu-moe-512.log").read_text()
    rpc = [b for b in parse_buffer_sizes(log) if b.kind == "model" and b.device.startswith("RPC0")]
    assert [b.mib for b in rpc] == [record.memory[1].device_mib["model"]]


def test_quality_against_f16(benched):
    _, _, ws, outcomes = benched
    quality = {q: outcomes[q].record.quality for q in LADDER}
    bases = {q.base.ppl for q in quality.values()}
    assert len(bases) == 1 and bases.pop() > 1  # one F16 run, reused
    kld = [quality[q].quant.kld_mean for q in LADDER]
    assert 0 < kld[0] < kld[1] < kld[2], kld  # more bits, less divergence
    top = [quality[q].quant.same_top_p for q in LADDER]
    assert top[0] > top[2]
    for q in LADDER:
        assert quality[q].quant.ppl_ratio > 0
        choice = Records(ws).get(ChoiceRecord, q)  # Q4_K_M and Q2_K: measured once, by the choice stage
        folder = choice.published.name.folder if choice else None
        log = ws.root / "choice" / q / f"perplexity-{folder}.log" if choice else ws.root / "bench" / q / "perplexity.log"
        assert parse_perplexity(log.read_text())["kld_mean"] == quality[q].quant.kld_mean
    assert [q for q in LADDER if Records(ws).get(ChoiceRecord, q)] == ["Q4_K_M", "Q2_K"]


def test_rerun_reuses_the_record_unless_forced(benched, toolchain, rpc_device):
    _, pipeline, ws, outcomes = benched
    log = ws.root / "bench" / "Q8_0" / "speed-gpu.log"
    before = log.stat().st_mtime_ns
    again = run_target(pipeline, "bench", "Q8_0", rpc=rpc_device)
    assert again.up_to_date and again.record == outcomes["Q8_0"].record
    assert log.stat().st_mtime_ns == before  # no tool ran
    forced = run_target(pipeline, "bench", "Q8_0", rpc=rpc_device, force=True,
                         modes=("cpu-moe",))
    assert not forced.up_to_date and [r.mode for r in forced.record.speed] == ["cpu-moe"]


def test_card_shows_the_measurements(benched, toolchain, rpc_device):
    _, pipeline, ws, _ = benched
    run_target(pipeline, "bench", "Q8_0", rpc=rpc_device, force=True)
    outcome = card_for(pipeline, "Q4_K_M")
    assert outcome.record.not_measured == []
    text = (ws.repo_dir(None) / "README.md").read_text()
    assert "#### Speed" in text and "#### VRAM with and without `--cpu-moe`" in text and "#### Quality against F16" in text
    measured = text.split("### Measured speed, VRAM and quality")[1].split("### Quantization details")[0]
    rpc = "a ggml-rpc-server on the same machine, llama.cpp's RPC backend standing in for a GPU"
    assert f"offload device: {rpc}" in measured and "not measured" not in measured
    assert "127.0.0.1" not in text and not re.search(r":\d{4,5}\b", measured)  # no ephemeral port is published
    memory = measured.split("#### VRAM with and without `--cpu-moe`")[1].split("|")[0]
    assert f"buffer sizes on RPC0 ({rpc})" in memory and memory.count("RPC") == 2  # the device named once
    assert "; llama.cpp 0c1e570 (CPU-only build); " in measured
    manifest = read_manifest(ws.repo_dir(None) / MANIFEST_NAME)
    # The choice table shows the KL divergence, and no speed for the placement it advises: the device measured in
    # it was the RPC server, a CPU standing in for the GPU (the CPU mode's speed is in the speed table).
    choice = next(line for line in text.splitlines() if line.startswith("| 8 GiB or more | Q4_K_M | "))
    record = outcome.record
    assert "| not measured on a GPU (a CPU stood in for it) | " in choice and record.quants == ["Q4_K_M"]
    assert choice.split(" | ")[-1].rstrip(" |") == manifest.quants[0].records.bench.quality.quant.kld_mean.__format__(".6f") \
        + f" ± {manifest.quants[0].records.bench.quality.quant.kld_mean_err:.6f}"
    assert lint_card(text, "README.md", manifest) == []
    # A hand-typed speed is caught by lint against the published records.
    row = next(line for line in measured.splitlines() if "| tg16 |" in line)
    assert [f.rule for f in lint_card(text.replace(row, row[: row.rindex("|", 0, -1)] + "| 99999.99 |"),
                                      "README.md", manifest)] == ["unrecorded-figure"]
    assert "| everything in system RAM, no GPU | `-ngl 0` | pp64 |" in measured
    # The PPL ratio is of the two perplexities beside it; one that disagrees (llama-perplexity's own, whose base
    # is recomputed from the saved logits) is refused.
    quality = manifest.quants[0].records.bench.quality
    rows = {line.split(" | ")[0]: line for line in measured.splitlines() if line.startswith("| P")}
    ratio = quality.quant.ppl_q / quality.base.ppl
    assert rows["| PPL ratio, this file / F16"].split(" | ")[1] == f"{ratio:.4f}"
    tool_ratio = rows["| PPL ratio, this file / F16"].replace(f"| {ratio:.4f} |", f"| {ratio + 0.05:.4f} |", 1)
    findings = lint_card(text.replace(rows["| PPL ratio, this file / F16"], tool_ratio), "README.md")
    assert [(f.rule, f.message.split(" (")[0]) for f in findings] == [
        ("derived-figure", f"PPL ratio {ratio + 0.05:.4f}")]
    # The same records as a real GPU's (no RPC stand-in): "In short" and "Which file" quote the speed measured in
    # the placement they advise, or mark it noisy, and the card still lints clean.
    on_gpu = manifest.model_copy(deep=True)
    for entry in on_gpu.quants:
        entry.records.bench.options.rpc = False
    gpu_text = render_card(card_facts(on_gpu))
    tg = next(t for run in on_gpu.quants[0].records.bench.speed if run.mode == "gpu" for t in run.tests
              if t.test.startswith("tg"))
    short = gpu_text.split("## In short")[1].split("## ")[0]
    if tg.stddev_ts > NOISY * tg.avg_ts:
        assert "tokens/s" not in short and "| too noisy to quote |" in gpu_text
    else:
        assert f"about {tg.avg_ts:.2f} tokens/s generating" in short
    assert lint_card(gpu_text, "README.md", on_gpu) == []


@pytest.mark.slow
def test_without_a_gpu_the_cpu_mode_is_measured_and_offload_modes_are_not(tmp_path, toolchain):
    """No GPU and no RPC device: not a failure. The cpu mode runs, the offload modes say why they were not measured."""
    config, pipeline, ws = prepared(tmp_path, quants=("Q2_K",), rpc=False)
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q2_K", "--json")
    assert proc.returncode == 0, proc.stderr
    [result] = json.loads(proc.stdout)
    record = result["record"]
    assert record["errors"] == []
    assert [r["mode"] for r in record["speed"]] == ["cpu"] and record["speed"][0]["backends"] == "CPU"
    assert all(t["avg_ts"] > 0 for t in record["speed"][0]["tests"])
    assert [m["mode"] for m in record["not_measured"]] == ["gpu", "cpu-moe", "ncmoe 1"]
    assert all(m["reason"] == "no GPU or RPC device" for m in record["not_measured"])
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q2_K")
    assert proc.returncode == 0 and ("Q2_K: not measured: gpu, cpu-moe, ncmoe 1 (no GPU or RPC device); to measure "
                                     "them, run on a machine with an NVIDIA GPU and the CUDA build (scripts/setup --backend cuda) or "
                                     "pass --rpc HOST:PORT") in proc.stdout
    assert record["quality"]["quant"]["kld_mean"] > 0  # measured all the same
    assert "Traceback" not in proc.stderr
    outcome = card_for(pipeline, "Q2_K")
    text = (ws.repo_dir(None) / "README.md").read_text()
    assert "measured VRAM (bench)" in outcome.record.not_measured
    assert "- all layers on the GPU (`-ngl 99`): no GPU or RPC device\n" in text
    assert "not measured (no GPU or RPC device; the memory section above is computed" in text
    # The build goes on to the card: no stage fails for want of a GPU.
    proc = run_moeq("build", "--config", str(config), "--quant", "Q2_K", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {s["stage"]: s["status"] for s in json.loads(proc.stdout)["quants"][0]["stages"]}["bench"] == "up to date"


@pytest.mark.slow
def test_an_offload_mode_that_was_tried_and_failed_is_an_error(tmp_path, toolchain):
    """An RPC device given but unreachable: the offload modes were tried, so they are errors (exit 4)."""
    config, _, _ = prepared(tmp_path, quants=("Q8_0",), rpc=False)
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q8_0", "--modes", "cpu", "--modes", "gpu",
                    "--rpc", "127.0.0.1:1", "--json")
    assert proc.returncode == 4
    [result] = json.loads(proc.stdout)
    assert [r["mode"] for r in result["record"]["speed"]] == ["cpu"]
    assert [e["mode"] for e in result["record"]["errors"]] == ["gpu"] and result["record"]["not_measured"] == []


@pytest.mark.slow
def test_model_that_fails_to_load_is_reported_per_mode(tmp_path, toolchain, rpc_device):
    config, pipeline, ws = prepared(tmp_path, quants=("Q2_K",))
    model = ws.quant_path("tiny-phimoe-Q2_K.gguf")
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])  # damaged after validation
    # The bench stage itself, handed the records (a command's plan would see the damage and quantize again)
    ctx = Context.of(pipeline)
    quantized, validated = ctx.records.require(QuantizeRecord, "Q2_K"), ctx.records.require(ValidateRecord, "Q2_K")
    outcome = wiring.bench(ctx, pipeline.quant("Q2_K"), quantized, validated, None, rpc=rpc_device, modes=("cpu-moe",))
    modes = [e.mode for e in outcome.record.errors]
    assert modes == ["cpu-moe", "quality"]
    assert all("exited" in e.error and "full log:" in e.error for e in outcome.record.errors)
    assert outcome.record.speed == [] and outcome.record.quality is None


@pytest.mark.slow
def test_bench_right_after_quantize_validates_first(tmp_path, toolchain, rpc_device):
    """No validate record yet: `moeq bench` runs the plan cut at the bench, so the file is validated first and the
    memory plan is the validation's."""
    config = pipeline_file(tmp_path)
    assert run_moeq("quantize", "--config", str(config), "--quant", "Q8_0").returncode == 0
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q8_0", "--modes", "cpu-moe", "--rpc", rpc_device,
                    "--json")
    assert proc.returncode == 0, proc.stderr
    [memory] = json.loads(proc.stdout)[0]["record"]["memory"]
    assert memory["mode"] == "cpu-moe" and abs(memory["difference_mib"]["model"]) <= 0.1
    assert (tmp_path / "work" / "records" / "validate-Q8_0.json").is_file()


def test_perplexity_uncertainty_printed_as_nan_is_parsed(tmp_path, toolchain, tiny_model):
    """The F16 against its own logits: llama-perplexity prints `± nan` (or -nan) for the ratio; that is no failure."""
    from moeq.kld import run_perplexity

    text = shipped_evaluation()
    kwargs = dict(ctx=128, chunks=4, threads=None, timeout_s=300)
    run_perplexity(toolchain.path("llama-perplexity"), tiny_model, text, tmp_path / "base.log",
                   kld_base=tmp_path / "base.kld", save_base=True, **kwargs)
    figures = run_perplexity(toolchain.path("llama-perplexity"), tiny_model, text, tmp_path / "same.log",
                             kld_base=tmp_path / "base.kld", save_base=False, **kwargs)
    assert "nan" in (tmp_path / "same.log").read_text().split("Mean PPL(Q)/PPL(base)")[1].splitlines()[0]
    assert figures["ppl_ratio"] == pytest.approx(1.0) and figures["ppl_ratio_err"] is None
    assert figures["kld_mean"] == pytest.approx(0.0, abs=1e-6)
    assert parse_perplexity("Mean PPL(Q)/PPL(base) : 0.999996 ± -nan\nMean    KLD:   inf ± nan\n") == {
        "ppl_ratio": 0.999996, "ppl_ratio_err": None, "kld_mean": None, "kld_mean_err": None}


def test_a_missing_figure_names_the_line(tmp_path, toolchain, tiny_model):
    """llama-perplexity whose output lacks one expected line (as when it exits before its log is flushed)."""
    from moeq.kld import run_perplexity
    from moeq.errors import ToolError

    real = toolchain.path("llama-perplexity")
    tool = tmp_path / "llama-perplexity"
    tool.write_text(f'#!/bin/sh\n{real} "$@" 2>&1 | grep -v "Same top p"\n')
    tool.chmod(0o755)
    link_log_flush(tmp_path, toolchain)  # the real tool keeps its log tail: only the line taken out is missing
    text, kwargs = shipped_evaluation(), dict(ctx=128, chunks=2, threads=None, timeout_s=300)
    run_perplexity(real, tiny_model, text, tmp_path / "base.log", kld_base=tmp_path / "b.kld", save_base=True,
                   **kwargs)
    with pytest.raises(ToolError) as info:
        run_perplexity(tool, tiny_model, text, tmp_path / "p.log", kld_base=tmp_path / "b.kld", save_base=False,
                       **kwargs)
    error = info.value
    assert (error.where, error.problem, error.fix) == (
        "llama-perplexity", f"exited 0 without its 'Same top p: ...' line for {tiny_model.name}", f"see {tmp_path / 'p.log'}")
    assert (tmp_path / "p.log").read_text().count("$ ") == 1  # one run, one log: never run again


def test_a_text_too_short_for_one_chunk_is_refused_before_running(tmp_path, toolchain, tiny_model):
    from moeq.kld import run_perplexity
    from moeq.errors import InputError

    short = tmp_path / "short.txt"
    short.write_text("Too short a text for any chunk.\n")
    with pytest.raises(InputError) as info:
        run_perplexity(toolchain.path("llama-perplexity"), tiny_model, short, tmp_path / "p.log", ctx=128, chunks=4,
                       kld_base=tmp_path / "b.kld", save_base=True, threads=None, timeout_s=300)
    assert info.value.message == (f"{short}: 32 bytes, fewer than the 256 tokens llama-perplexity needs for one "
                                  "chunk of 128; use a longer text (bench.perplexity.text) or a smaller "
                                  "bench.perplexity.ctx")
    assert not (tmp_path / "p.log").exists()


@pytest.mark.slow
def test_a_mode_over_its_time_limit_is_stopped_and_reported(tmp_path, toolchain, rpc_device):
    # llama-bench answers --version, then hangs without a word
    folder = tool_folder(tmp_path / "bin", toolchain, {"llama-bench": '[ "$1" = --version ] && exec {real} --version\n'
                                                                     "sleep 60\n"})
    config, pipeline, ws = prepared(tmp_path, quants=("Q8_0",))
    # The limit applies to every tool: 5 s and 4 chunks leave llama-perplexity time enough on a busy machine.
    config.write_text(config.read_text().replace("  repetitions: 2\n", "  repetitions: 2\n  timeout_s: 5\n")
                      .replace("chunks: 64", "chunks: 4")
                      + f"\ntoolchain:\n  llama_cpp_bin: {folder}\n")
    pipeline = load_pipeline(config)
    started = time.monotonic()
    outcome = run_target(pipeline, "bench", "Q8_0", rpc=rpc_device, modes=("gpu",))
    assert time.monotonic() - started < 30
    assert outcome.record.errors[0].mode == "gpu"
    assert outcome.record.errors[0].error.startswith("llama-bench: still running after 5 s, stopped; log: ")
    assert outcome.record.quality is not None  # the other measurements still ran


@pytest.mark.slow
def test_cli_with_an_rpc_device(tmp_path, toolchain, rpc_device):
    config, _, _ = prepared(tmp_path, quants=("Q8_0",), rpc=False)
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q8_0", "--modes", "cpu-moe", "--rpc", rpc_device)
    assert proc.returncode == 0, proc.stderr
    assert "Q8_0: measured on" in proc.stdout and "cpu-moe" in proc.stdout
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q8_0", "--modes", "cpu-moe", "--rpc", rpc_device,
                    "--json")
    [result] = json.loads(proc.stdout)
    assert result["skipped"] is True and [r["mode"] for r in result["record"]["speed"]] == ["cpu-moe"]
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q8_0", "--modes", "fast")
    assert proc.returncode == 3 and "--modes 'fast': not an offload mode; use cpu, gpu, cpu-moe, or an integer N" in proc.stderr


def _hanging_tools(tmp_path: Path, toolchain, hang: str, script: str) -> Path:
    """The real tools, except `hang`, which answers --version/--list-devices and otherwise runs `script`."""
    return tool_folder(tmp_path / "bin", toolchain, {
        hang: 'case "$1" in --version|--list-devices) exec {real} "$1";; esac\n' + script.replace("{", "{{").replace("}", "}}") + "\n"})


@pytest.mark.slow
@pytest.mark.parametrize("hang", ["llama-bench", "llama-perplexity"])
def test_sigterm_during_bench_records_nothing(tmp_path, toolchain, hang):
    """An interrupted bench is not a measurement failure: exit 143, no record, no partial file; the next run measures."""
    import os
    import signal
    import subprocess
    import sys

    marker = tmp_path / "running"
    # llama-perplexity saving F16 logits: it has begun writing the --kl-divergence-base file when stopped.
    script = (f'touch {marker}\nwhile [ $# -gt 0 ]; do [ "$1" = --kl-divergence-base ] && : > "$2"; shift; done\n'
              "sleep 60")
    folder = _hanging_tools(tmp_path, toolchain, hang, script)
    config, _, ws = prepared(tmp_path, quants=("Q8_0",), rpc=False)
    config.write_text(config.read_text() + f"\ntoolchain:\n  llama_cpp_bin: {folder}\n")
    proc = subprocess.Popen([sys.executable, "-m", "moeq", "bench", "--config", str(config), "--quant", "Q8_0",
                             "--modes", "cpu"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate(timeout=5)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, out + err
    assert err.splitlines()[-1].startswith("error: interrupted by SIGTERM") and "Traceback" not in err
    assert not ws.record_path("bench", "Q8_0").exists()
    assert not [p for p in ws.root.rglob("*") if p.name.endswith(".partial")]
    config.write_text(config.read_text().replace(f"\ntoolchain:\n  llama_cpp_bin: {folder}\n", ""))
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q8_0", "--modes", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["record"]["errors"] == []


def test_quality_can_be_left_out(tmp_path, toolchain):
    """bench.quality: false (random weights, where perplexity means nothing): no llama-perplexity run at all."""
    config, pipeline, ws = prepared(tmp_path, quants=("Q8_0",), rpc=False)
    config.write_text(config.read_text().replace("  repetitions: 2\n", "  repetitions: 2\n  quality: false\n"))
    pipeline = load_pipeline(config)
    record = run_target(pipeline, "bench", "Q8_0", modes=("cpu",)).record
    assert record.quality is None and record.errors == [] and record.options.quality is False
    assert not (ws.root / "bench" / "Q8_0" / "perplexity.log").exists()
    assert "quality (bench)" in card_for(pipeline, "Q8_0").record.not_measured


def test_the_f16_logits_of_older_settings_are_deleted(tmp_path, toolchain, tiny_model):
    """Only one set of saved F16 logits per purpose: a change of the perplexity settings replaces it, and the
    selection text's logits (a recipe search's) are left alone."""
    from moeq.kld import base_logits
    from moeq.records import FileRef, PerplexityOptions
    from moeq.workspace import Workspace

    ws = Workspace(tmp_path / "work")
    text = shipped_evaluation()
    source = FileRef(path=str(tiny_model), size=tiny_model.stat().st_size, sha256="0" * 64)

    def made(ctx: int, purpose: str) -> Path:
        options = PerplexityOptions(text=text.name, text_sha256="1" * 64, ctx=ctx, chunks=2)
        kld, _figures = base_logits(ws, toolchain, source, options, text, "0c1e570", threads=None, timeout_s=300,
                                    purpose=purpose)
        return kld

    first, selection = made(128, "evaluation"), made(128, "selection")
    legacy = first.with_name("0123456789abcdef.kld")  # named by an older moeq
    legacy.write_bytes(b"old")
    second = made(256, "evaluation")
    assert second != first and second.is_file() and selection.is_file()
    assert not first.exists() and not first.with_suffix(".json").exists() and not legacy.exists()
    assert sorted(p.name for p in first.parent.glob("*.kld")) == sorted([second.name, selection.name])

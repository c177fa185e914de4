"""The imatrix stage on the trained tiny model, with the real llama-imatrix and llama-quantize."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from moeq.config import load_pipeline
from moeq.errors import InputError
from moeq.texts import shipped_calibration
from moeq.records import QuantizeRecord
from moeq.steps import wiring
from moeq.steps.context import Context
from moeq.steps.repos import repo_units

from conftest import example_section, pipeline_file, run_moeq, tool_folder



def pipeline(folder: Path, imatrix: dict | None = None, **sections) -> Path:
    """The example pipeline in `folder` (its workspace there), with another imatrix: section. Without quality
    figures, so a quant with an importance matrix is made with it (the choice between with and without it is
    test_choice.py's)."""
    sections.setdefault("bench", {**example_section("bench"), "quality": False})
    return pipeline_file(folder, imatrix={"ctx": 256, **(imatrix or {})}, **sections)


def quants(q4_k_m_imatrix: str) -> list:
    """The example's ladder, its Q4_K_M made with another importance matrix."""
    return [q if not isinstance(q, dict) or q["type"] != "Q4_K_M" else {**q, "imatrix": q4_k_m_imatrix}
            for q in example_section("quants")]


def imatrix_json(config: Path, *args: str) -> dict:
    proc = run_moeq("imatrix", "--config", str(config), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def counts_in(path: Path) -> dict[int, list[int]]:
    """Tokens per expert straight from the imatrix GGUF: blk.N.ffn_up_exps.weight.counts."""
    reader = gguf.GGUFReader(path)
    out = {}
    for tensor in reader.tensors:
        if tensor.name.endswith("ffn_up_exps.weight.counts"):
            out[int(tensor.name.split(".")[1])] = [int(c) for c in np.asarray(tensor.data).reshape(-1)]
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict]:
    config = pipeline(tmp_path_factory.mktemp("imatrix"))
    return config, imatrix_json(config)["record"]


def test_record_holds_the_per_expert_counts_of_the_imatrix_gguf(made):
    config, record = made
    path = config.parent / "work" / "imatrix" / "tiny-phimoe.imatrix"
    assert Path(record["output"]["path"]) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["output"]["sha256"]
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.type").contents() == "imatrix"
    in_file = counts_in(path)
    coverage = record["coverage"]
    assert {int(k): v for k, v in coverage["tokens"].items()} == in_file
    assert sorted(in_file) == [0, 1] and all(len(v) == 4 for v in in_file.values())
    flat = [c for v in in_file.values() for c in v]
    assert (coverage["min"], coverage["max"], coverage["experts"]) == (min(flat), max(flat), 8)
    # Two experts per token: each layer's counts add up to twice the tokens evaluated.
    chunks = reader.get_field("imatrix.chunk_count").contents()
    assert record["chunks"] == chunks and record["ctx"] == 256 and record["tokens"] == chunks * 256
    assert all(sum(v) == 2 * record["tokens"] for v in in_file.values())
    calibration = shipped_calibration()
    assert record["calibration"] == {
        "name": "calibration.txt", "size": calibration.stat().st_size, "shipped": True,
        "sha256": hashlib.sha256(calibration.read_bytes()).hexdigest(), "sources": record["calibration"]["sources"]}
    assert len(record["calibration"]["sources"]) == 3
    assert coverage["under"] == [] and record["warnings"] == []
    assert Path(record["command"][0]).name == "llama-imatrix" and "-c" in record["command"]


def test_a_second_run_is_up_to_date(made):
    config, record = made
    again = imatrix_json(config)
    assert again["skipped"] and again["record"]["output"] == record["output"]


def starving_text(folder: Path) -> Path:
    """A calibration text of one word over and over: every token looks the same to the router."""
    text = folder / "one-word.txt"
    text.write_text("moeq " * 4000)
    return text


def error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) >= 1
    return lines[-1]


def imatrix_files(config: Path) -> list[str]:
    folder = config.parent / "work" / "imatrix"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".log")) if folder.is_dir() else []


@pytest.mark.slow
def test_an_expert_the_calibration_never_reaches_is_named(tmp_path):
    text = starving_text(tmp_path)
    config = pipeline(tmp_path / "warn", {"calibration": str(text)})
    record = imatrix_json(config)["record"]
    under = record["coverage"]["under"]
    assert any(u["tokens"] == 0 for u in under), record["coverage"]["tokens"]  # an expert it never reached
    tokens = {int(k): v for k, v in record["coverage"]["tokens"].items()}
    assert under == [{"layer": layer, "expert": expert, "tokens": count} for layer, counts in sorted(tokens.items())
                     for expert, count in enumerate(counts) if count < 32]
    listed = ", ".join(f"layer {u['layer']} expert {u['expert']} ({u['tokens']})" for u in under)
    assert record["warnings"] == [f"{len(under)} of 8 experts got fewer than 32 tokens of one-word.txt "
                                  f"(imatrix.min_expert_tokens): {listed}"]
    assert record["calibration"]["shipped"] is False and record["calibration"]["sources"] == []
    # The warning reaches the card of a quant made with it.
    proc = run_moeq("build", "--config", str(config), "--quant", "Q4_K_M", "--skip-bench", "--json")
    assert proc.returncode == 0, proc.stderr
    card = (config.parent / "work" / "repos" / "ladder" / "README.md").read_text()
    assert f"- **Warning**: {len(under)} of 8 experts got fewer than 32 tokens" in card
    assert listed in card


def test_require_coverage_refuses_and_leaves_no_imatrix(tmp_path):
    text = starving_text(tmp_path)
    config = pipeline(tmp_path / "refuse", {"calibration": str(text), "require_coverage": True})
    proc = run_moeq("imatrix", "--config", str(config))
    assert proc.returncode == 3
    line = error_line(proc)
    assert line.startswith(f"error: {text}: ") and "experts got fewer than 32 tokens" in line
    assert line.endswith("or set imatrix.require_coverage: false to publish with a warning")
    assert imatrix_files(config) == []
    assert not (config.parent / "work" / "records" / "imatrix.json").exists()


def test_a_calibration_text_shorter_than_two_chunks_is_refused(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("A few words are not enough to calibrate anything.\n")
    config = pipeline(tmp_path / "short", {"calibration": str(text)})
    proc = run_moeq("imatrix", "--config", str(config))
    assert proc.returncode == 3
    assert error_line(proc).startswith(f"error: {text}: tokenizes to ")
    assert "llama-imatrix needs at least 512 (two chunks of imatrix.ctx 256)" in error_line(proc)
    assert imatrix_files(config) == []


def test_llama_imatrix_failing_is_one_line_and_leaves_nothing(tmp_path, toolchain):
    tools = tool_folder(tmp_path / "bin", toolchain, {"llama-imatrix": (
        '[ "$1" = --help ] && exec {real} --help\n'
        'for a; do case "$prev" in -o) : > "$a";; esac; prev="$a"; done\necho "simulated crash" >&2\nexit 134\n')})
    config = pipeline(tmp_path / "crash", toolchain={"llama_cpp_bin": str(tools)})
    proc = run_moeq("imatrix", "--config", str(config))
    assert proc.returncode == 4, proc.stderr
    assert "llama-imatrix" in error_line(proc) and "simulated crash" in proc.stderr
    assert imatrix_files(config) == []


def quantize_json(config: Path, quant: str) -> dict:
    proc = run_moeq("quantize", "--config", str(config), "--quant", quant, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


def test_auto_passes_the_stage_output_to_llama_quantize(made):
    config, record = made
    quantized = quantize_json(config, "Q4_K_M")["record"]
    command = quantized["command"]
    assert command[command.index("--imatrix") + 1] == "tiny-phimoe.imatrix"  # run from its folder
    # What llama-quantize writes into the file names no local folder: the published file is the same anywhere.
    written = gguf.GGUFReader(quantized["output"]["path"])
    assert written.get_field("quantize.imatrix.file").contents() == "tiny-phimoe.imatrix"
    assert written.get_field("quantize.imatrix.dataset").contents() == "calibration.txt"
    assert gguf.GGUFReader(record["output"]["path"]).get_field("imatrix.datasets").contents() == ["calibration.txt"]
    assert quantized["options"]["imatrix"] == {"path": record["output"]["path"], "sha256": record["output"]["sha256"]}
    log = (config.parent / "work" / "quants" / "tiny-phimoe-Q4_K_M.gguf.log").read_text()
    assert "loaded 21 importance matrix entries" in log or "importance matrix entries" in log
    q8 = quantize_json(config, "Q8_0")["record"]
    assert "--imatrix" not in q8["command"] and q8["options"]["imatrix"] is None


def other_model_imatrix(tmp_path: Path, toolchain, width: int) -> Path:
    """A real imatrix of another tiny model (random weights, another width), from the real llama-imatrix."""
    from moeq.config import SynthSpec
    from moeq.synth import write_synth_model

    model = write_synth_model(tmp_path / f"other-{width}.gguf", SynthSpec(embd=width, vocab=512))
    out = tmp_path / f"other-{width}.imatrix.gguf"
    import subprocess

    subprocess.run([str(toolchain.path("llama-imatrix")), "-m", str(model), "-f", str(shipped_calibration()),
                    "-o", str(out), "-c", "128", "--chunks", "4"], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("damage", ["another model", "truncated"])
def test_an_imatrix_path_that_does_not_fit_is_refused_before_llama_quantize(tmp_path, toolchain, made, damage):
    config, record = made
    if damage == "another model":
        path = other_model_imatrix(tmp_path, toolchain, 512)
        expected = (f"error: {path}: entry blk.0.attn_k.weight is 512 wide over 1 rows, but the tensor in "
                    "tiny-phimoe-F16.gguf is 256 wide with 1 experts; this importance matrix is of another model: "
                    "make one for this model with moeq imatrix")
    else:
        path = tmp_path / "cut.imatrix"
        data = Path(record["output"]["path"]).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = f"error: {path}: not a readable importance matrix ("
    own = pipeline_file(tmp_path, quants=quants(str(path)), workspace=str(config.parent / "work"))
    before = Path(config.parent / "work" / "quants" / "tiny-phimoe-Q4_K_M.gguf")
    mtime = before.stat().st_mtime_ns if before.exists() else None
    proc = run_moeq("quantize", "--config", str(own), "--quant", "Q4_K_M")
    assert proc.returncode == 3, proc.stderr
    assert error_line(proc).startswith(expected)
    assert not list((config.parent / "work" / "quants").glob("*.partial"))
    assert (before.stat().st_mtime_ns if before.exists() else None) == mtime  # the file there was left alone


@pytest.mark.slow
def test_changing_the_calibration_reruns_imatrix_and_its_quants_only(tmp_path):
    config = pipeline(tmp_path / "change")
    first = run_moeq("build", "--config", str(config), "--all", "--skip-bench", "--json")
    assert first.returncode == 0, first.stderr
    text = tmp_path / "calibration.txt"
    text.write_text(shipped_calibration().read_text()[:40000])
    config = pipeline(tmp_path / "change", {"calibration": str(text)})
    second = run_moeq("build", "--config", str(config), "--all", "--skip-bench", "--json")
    assert second.returncode == 0, second.stderr
    got = {q["quant"]: {s["stage"]: s["status"] for s in q["stages"]} for q in json.loads(second.stdout)["quants"]}
    assert got["Q8_0"]["imatrix"] == "skipped" and got["Q8_0"]["quantize"] == "up to date"
    for quant in ("Q4_K_M", "Q2_K"):
        assert got[quant]["fetch"] == "up to date"
        assert got[quant]["imatrix"] == "ran" and got[quant]["quantize"] == "ran" and got[quant]["validate"] == "ran"
    third = run_moeq("build", "--config", str(config), "--all", "--skip-bench", "--json")
    statuses = {s["status"] for q in json.loads(third.stdout)["quants"] for s in q["stages"]}
    assert statuses <= {"up to date", "skipped"}


@pytest.mark.slow
def test_the_legacy_format_when_asked(tmp_path):
    config = pipeline(tmp_path / "dat", {"format": "dat"})
    record = imatrix_json(config)["record"]
    path = Path(record["output"]["path"])
    assert path.name == "tiny-phimoe.imatrix.dat" and record["format"] == "dat"
    assert path.read_bytes()[:4] != b"GGUF" and record["coverage"]["experts"] == 8  # counted from the GGUF first
    quantized = quantize_json(config, "Q2_K")["record"]
    assert quantized["options"]["imatrix"]["path"] == str(path)
    assert imatrix_files(config) == ["tiny-phimoe.imatrix.dat"]


def test_an_imatrix_made_elsewhere_is_published_as_given(tmp_path, made):
    _, record = made
    elsewhere = tmp_path / "from-elsewhere.imatrix"
    shutil.copyfile(record["output"]["path"], elsewhere)
    config = pipeline(tmp_path / "path", quants=quants(str(elsewhere)))
    proc = run_moeq("build", "--config", str(config), "--quant", "Q4_K_M", "--skip-bench", "--json")
    assert proc.returncode == 0, proc.stderr
    stages = {s["stage"]: s for s in json.loads(proc.stdout)["quants"][0]["stages"]}
    assert stages["imatrix"]["status"] == "skipped" and stages["imatrix"]["detail"] == "uses from-elsewhere.imatrix"
    repo = config.parent / "work" / "repos" / "ladder"
    assert (repo / "from-elsewhere.imatrix").read_bytes() == elsewhere.read_bytes()  # a copy: it lives outside
    card = (repo / "README.md").read_text()
    assert "The importance matrix was made outside this pipeline; the repo publishes it as it was given." in card
    assert run_moeq("card", "verify", str(repo / "README.md")).returncode == 0
    assert not (config.parent / "work" / "imatrix").exists()  # no imatrix stage ran


@pytest.mark.parametrize("section,message", [
    ({"format": "binary"}, "imatrix.format: unknown format 'binary'; use gguf (llama.cpp's default) or dat"),
    ({"calibration": "missing.txt"}, "imatrix.calibration: {folder}/missing.txt does not exist; fix the path"),
    ({"min_expert_tokens": -1}, "imatrix.min_expert_tokens: must be at least 0, got -1"),
    ({"chunk": 4}, "imatrix.chunk: unknown key; allowed here: calibration, ctx, chunks, min_expert_tokens, "
                     "require_coverage, format"),
])
def test_imatrix_settings_are_checked(tmp_path, section, message):
    config = pipeline(tmp_path, section)
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2
    assert message.format(folder=tmp_path) in error_line(proc)


def test_a_quant_imatrix_path_that_does_not_exist_is_a_config_error(tmp_path):
    config = pipeline(tmp_path, quants=[*example_section("quants")[:2], {"type": "Q2_K", "imatrix": "nowhere.imatrix"}])
    proc = run_moeq("check-config", "--config", str(config))
    assert proc.returncode == 2
    assert f"quants[2].imatrix: {tmp_path}/nowhere.imatrix does not exist; fix the path" in error_line(proc)


@pytest.mark.slow
def test_a_card_never_publishes_another_matrix_than_the_quant_was_made_with(tmp_path):
    """The calibration text changed and imatrix ran again, but Q4_K_M was not made again: its card refuses."""
    config = pipeline(tmp_path / "stale")
    assert run_moeq("build", "--config", str(config), "--quant", "Q4_K_M", "--skip-bench").returncode == 0
    text = tmp_path / "calibration.txt"
    text.write_text(shipped_calibration().read_text()[:30000])
    config = pipeline(tmp_path / "stale", {"calibration": str(text)})
    assert run_moeq("imatrix", "--config", str(config)).returncode == 0
    # The card stage handed these records refuses (moeq card's plan would make Q4_K_M again with the new matrix first)
    loaded = load_pipeline(config)
    ctx = Context.of(loaded)
    quantized = ctx.records.require(QuantizeRecord, "Q4_K_M")
    [unit] = repo_units(ctx, [loaded.quant("Q4_K_M")])
    with pytest.raises(InputError) as error:
        wiring.card(ctx, unit, [(loaded.quant("Q4_K_M"), wiring.shards(ctx, quantized).record)], force=True)
    matrix = config.parent / "work" / "imatrix" / "tiny-phimoe.imatrix"
    assert str(error.value) == (f"{matrix}: not the importance matrix Q4_K_M was made with (gone or changed "
                                "since); run moeq quantize --quant Q4_K_M again")


def test_progress_reports_the_time_of_a_pass_of_several_chunks(made):
    """llama-imatrix times its first pass, which holds batch / ctx chunks (8 at ctx 256), not one chunk."""
    config, _record = made
    proc = run_moeq("imatrix", "--config", str(config), "--force")
    assert proc.returncode == 0, proc.stderr
    log = (config.parent / "work" / "imatrix").glob("*.log")
    logged = "".join(path.read_text() for path in log)
    total = int(re.search(r"computing over (\d+) chunks, n_ctx=256, batch_size=2048, n_seq=8", logged).group(1))
    lines = [line for line in proc.stderr.splitlines() if line.startswith("llama-imatrix: ")]
    assert lines[0] == f"llama-imatrix: {total} chunks, {min(8, total)} per pass"
    assert re.fullmatch(rf"llama-imatrix: \d+\.\d s per pass of {min(8, total)} chunks, ETA .+", lines[1]), lines

"""Hostile inputs and faults, each through the real command line: the documented exit code, one line of
message, no traceback, nothing half-written, and (for the Hub) nothing changed on the Hub.

Bounds are tested with small limits (a resource limit on file size, a capped wait), never by exhausting
the machine. Faults that need a running tool (SIGTERM during bench, a huge Retry-After, a runaway
template's budget) are in test_bench.py, test_push.py and the test_card_*.py files beside their stages.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import HUB_TOKEN, REPO, default_sigint, pipeline_file, run_moeq

EXAMPLE = (REPO / "examples" / "tiny-phimoe.yaml").read_text()


def pipeline(tmp_path: Path, text: str = EXAMPLE, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, where: Path, *message: str) -> str:
    """The exit code, exactly one `error:` line (beside progress lines and the `pipeline:` note), no traceback,
    and no `.partial` file left under `where`. Returns the error line."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in message:
        assert part in lines[0], lines[0]
    assert not [p for p in where.rglob("*") if p.name.endswith(".partial")]
    return lines[0]


def with_quants(quants: str) -> str:
    return re.sub(r"quants:\n(?:  - .*\n)+", "quants:\n" + quants, EXAMPLE)


# ---------------------------------------------------------------- pipeline files: exit 2, nothing written

BAD_PIPELINES = {
    "quant file named README.md": (with_quants("  - {type: Q8_0, file: README.md}\n"),
                                   "quants[0].file: 'README.md' is not a GGUF file name"),
    "quant file named like the manifest": (with_quants("  - {type: Q8_0, file: moeq-manifest.json}\n"),
                                           "'moeq-manifest.json' is not a GGUF file name"),
    "quant file named like another's log": (with_quants("  - {type: Q8_0, file: a.gguf}\n"
                                                        "  - {type: Q4_K_M, file: a.gguf.log}\n"),
                                            "'a.gguf.log' is not a GGUF file name"),
    "quant file '.'": (with_quants("  - {type: Q8_0, file: .}\n"), "'.' is not a GGUF file name"),
    "two quants in one repo": (EXAMPLE.replace("  max_shard_size: 50GB\n", "  max_shard_size: 50GB\n  layout: per-quant\n"
                                               '  repo_template: "{namespace}/x-{quant:.1}"\n'),
                               "gives 'moeq-test/x-Q' for both Q8_0 and Q4_K_M"),
    "a file without its quant type in one repo": (with_quants("  - {type: Q8_0, file: model.gguf}\n"),
                                                  "Q8_0's file 'model.gguf' does not carry its quant type"),
    "quant type F16": (with_quants("  - F16\n"), "F16 is not a quantization"),
    "quant type BF16": (with_quants("  - BF16\n"), "BF16 is not a quantization"),
    "python tag": (EXAMPLE.replace("name: tiny-phimoe", "name: !!python/name:os.system ''"),
                   "model.name: the YAML tag 'tag:yaml.org,2002:python/name:os.system' is not allowed"),
    "set in card.extra": (EXAMPLE.replace("card:\n  extra:\n", "card:\n  extra:\n    s: !!set {a, b}\n"),
                          "card.extra.s: the YAML tag 'tag:yaml.org,2002:set' is not allowed"),
    "binary in card.extra": (EXAMPLE.replace("card:\n  extra:\n", "card:\n  extra:\n    b: !!binary aGk=\n"),
                             "card.extra.b: the YAML tag 'tag:yaml.org,2002:binary' is not allowed"),
    "date in card.extra": (EXAMPLE.replace("card:\n  extra:\n", "card:\n  extra:\n    when: 2024-01-01\n"),
                           "card.extra.when: the YAML tag 'tag:yaml.org,2002:timestamp' is not allowed"),
    "nan in card.extra": (EXAMPLE.replace("card:\n  extra:\n", "card:\n  extra:\n    x: .nan\n"),
                          "card.extra.x: nan is not a usable number"),
    "duplicate key in card.extra": (EXAMPLE.replace("card:\n  extra:\n", "card:\n  extra:\n    a: 1\n    a: 2\n"),
                                    "card.extra.a: duplicate key (first at line"),
    "alias bomb in card.extra": (EXAMPLE.replace("card:\n  extra:\n", "card:\n  extra:\n"
                                 + "".join(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * 9)}]\n"
                                           for i in range(9))),
                                 "more than 10000 values (YAML aliases expand?)"),
    "100k-character name": (EXAMPLE.replace("name: tiny-phimoe", "name: " + "n" * 100_000),
                            "model.name: a name of 100000 characters; keep it to 200"),
    "300-character file_stem": (EXAMPLE.replace("file_stem: tiny-phimoe", "file_stem: " + "s" * 300),
                                "model.file_stem: a name of 300 characters; file names are at most 200"),
    "NUL in file_stem": (EXAMPLE.replace("file_stem: tiny-phimoe", 'file_stem: "tiny\\0phimoe"'),
                         "has characters a file name should not"),
    "newline in file_stem": (EXAMPLE.replace("file_stem: tiny-phimoe", 'file_stem: "tiny\\nphimoe"'),
                             "has characters a file name should not"),
    "emoji in file_stem": (EXAMPLE.replace("file_stem: tiny-phimoe", "file_stem: tiny-\U0001F680"),
                           "has characters a file name should not"),
    "timeout_s 1e20": (EXAMPLE.replace("  repetitions: 2\n", "  repetitions: 2\n  timeout_s: 100000000000000000000\n"),
                       "bench.timeout_s: must be at most 604800"),
    "n_prompt and n_gen both 0": (EXAMPLE.replace("  n_prompt: 64\n  n_gen: 16\n", "  n_prompt: 0\n  n_gen: 0\n"),
                                  "bench.n_gen: n_prompt and n_gen are both 0"),
    "huge synth": (EXAMPLE.replace("layers: 2,", "layers: 100000,"), "source.synth.layers: must be at most 256"),
    "a tensor_types pattern that backtracks": (
        with_quants("  - {type: Q8_0, tensor_types: {'(.*)*x': q8_0}}\n"),
        "'(.*)*x' repeats a group ('(...)*', '(...)+' or '(...)?'), which llama.cpp's regex engine can take minutes"),
    "a 200,000-character tensor_types pattern": (  # an explicit key: YAML's plain keys stop at 1024 characters
        with_quants("  - type: Q8_0\n    tensor_types:\n      ? %s\n      : q8_0\n" % ("a" * 200_000)),
        "a pattern of 200000 characters; keep it to 256"),
    "a tensor_types pattern that does not compile": (with_quants("  - {type: Q8_0, tensor_types: {'attn_(v': q8_0}}\n"),
                                                     "'attn_(v' is not a valid pattern"),
    "a file name with two quant labels": (with_quants("  - {type: Q8_0, file: probe-Q4_K_M-Q8_0.gguf}\n"),
                                          "Q8_0's file 'probe-Q4_K_M-Q8_0.gguf' also carries the quant type Q4_K_M"),
    "a python tag on a list": (EXAMPLE.replace("quants:\n", "quants: !!python/tuple\n"),
                               "quants: the YAML tag 'tag:yaml.org,2002:python/tuple' is not allowed; write a "
                               "plain list"),
    "a set tag on a mapping": (EXAMPLE.replace("hub:\n", "hub: !!set\n"),
                               "hub: the YAML tag 'tag:yaml.org,2002:set' is not allowed; write a plain mapping"),
    "an omap tag deep in card.extra": (EXAMPLE.replace("card:\n  extra:\n", "card:\n  extra:\n    o: !!omap [a: 1]\n"),
                                       "card.extra.o: the YAML tag 'tag:yaml.org,2002:omap' is not allowed"),
    # Hostile round 3: patterns that spun moeq's own regex (and would have spun llama-quantize's) for minutes
    "a tensor_types pattern of forty repetitions": (
        with_quants("  - {type: Q8_0, tensor_types: {'^token_embd\\.weight$|%s': q8_0}}\n" % (".*" * 40)),
        "repeats 40 times ('*', '+', '?'); a tensor pattern may repeat at most 2 times"),
    "a tensor_types pattern of fourteen classes repeated": (
        with_quants("  - {type: Q8_0, tensor_types: {'%s': q8_0}}\n" % ("[a-z._0-9]*" * 14)),
        "repeats 14 times"),
    # Hostile round 3: sizes of 400 digits were an internal error (OverflowError)
    "a 400-digit budget.bytes": (with_quants("  - {type: Q2_K, recipe: search, budget: {bytes: %s}}\n" % ("9" * 400)),
                                 "quants[0].budget.bytes: '999999999999"),
    "a 400-digit budget.gpu": (with_quants("  - {type: Q2_K, recipe: search, budget: {gpu: %sGB, placement: cpu-moe}}\n"
                                           % ("9" * 400)), "quants[0].budget.gpu: '999999999999"),
    "a 400-digit max_shard_size": (EXAMPLE.replace("  max_shard_size: 50GB\n", "  max_shard_size: %sGB\n" % ("9" * 400)),
                                   "hub.max_shard_size: '999999999999"),
}


@pytest.mark.parametrize("case", list(BAD_PIPELINES))
def test_bad_pipeline_is_refused_before_anything_is_written(tmp_path, case):
    text, message = BAD_PIPELINES[case]
    config = pipeline(tmp_path, text)
    for command in (["check-config"], ["build", "--all"]):
        proc = run_moeq(*command, "--config", str(config))
        line = assert_clean_failure(proc, 2, tmp_path, message)
        assert line.startswith(f"error: {config}:"), line  # FILE:LINE
        assert len(line) < len(str(config)) + 700, line[:300]  # a 200,000-character key is not echoed whole
    assert not (tmp_path / "work").exists()


def test_a_workspace_that_is_a_file(tmp_path):
    (tmp_path / "work").write_text("not a folder")
    proc = run_moeq("check-config", "--config", str(pipeline(tmp_path)))
    assert_clean_failure(proc, 2, tmp_path, "is a file, not a folder")


@pytest.mark.parametrize("where", ["/proc/moeq-work", "/sys/moeq-work"])
def test_a_workspace_where_nothing_can_be_written(tmp_path, where):
    config = pipeline(tmp_path, EXAMPLE.replace("workspace: work", f"workspace: {where}"))
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench")
    assert_clean_failure(proc, 6, tmp_path, f"{where}: cannot make the workspace here")


# ---------------------------------------------------------------- what moeq reads: bounded

@pytest.mark.parametrize("command", [["check-config", "--config", "/dev/zero"], ["card", "lint", "/dev/zero"],
                                     ["card", "verify", "/dev/zero"], ["card", "preview", "/dev/zero"]])
def test_dev_zero_is_not_read(tmp_path, command):
    proc = run_moeq(*command, cwd=tmp_path)
    assert_clean_failure(proc, 2 if command[0] == "check-config" else 3, tmp_path, "/dev/zero: not a regular file")


def test_oversized_pipeline_and_card(tmp_path):
    big = pipeline(tmp_path, EXAMPLE + "#" * (2 << 20) + "\n")
    assert_clean_failure(run_moeq("check-config", "--config", str(big)), 2, tmp_path,
                         "larger than 1024 KiB, the most moeq reads for a pipeline file")
    card = tmp_path / "README.md"
    card.write_text("x" * (2 << 20))
    assert_clean_failure(run_moeq("card", "lint", str(card)), 3, tmp_path, "larger than 1024 KiB")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unit", ["[", "![", "[a](", "<a:", "a.", "1.", "`", "a `", "``a`"])
def test_lint_reads_a_pathological_line_in_linear_time(tmp_path, unit):
    """200,000 repetitions: quadratic patterns took minutes to hours (the test's own time limit is the bound)."""
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\n---\n| " + unit * 200_000 + "\n")
    proc = run_moeq("card", "lint", str(card), "--json")
    assert proc.returncode == 7 and '"rule": "frontmatter"' in proc.stdout


def test_validate_and_plan_on_a_folder_and_a_short_file(tmp_path, tiny_model):
    assert_clean_failure(run_moeq("validate", str(tmp_path)), 3, tmp_path, f"{tmp_path}: a folder")
    assert_clean_failure(run_moeq("plan", str(tmp_path)), 3, tmp_path, f"{tmp_path}: a folder")
    from moeq.gguf_header import read_header

    short = tmp_path / "short.gguf"

    header = read_header(tiny_model)
    short.write_bytes(tiny_model.read_bytes()[:header.data_offset - 8])  # cut in the padding before the data
    proc = run_moeq("plan", str(short))
    assert_clean_failure(proc, 3, tmp_path, "shorter than its own header and metadata")
    assert "unexpected bytes" not in proc.stderr
    assert_clean_failure(run_moeq("plan", str(tiny_model), "--ctx", "-5"), 3, tmp_path,
                         "--ctx -5: out of range; a context size is 1 to")


# ---------------------------------------------------------------- a full disk: exit 6, nothing half-written

def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _moeq_limited(limit: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeq", *args], capture_output=True, text=True, cwd=cwd,
                          preexec_fn=_file_size_limit(limit), timeout=300)


def test_disk_full_while_making_the_source(tmp_path):
    config = pipeline(tmp_path)
    proc = _moeq_limited(1 << 20, "build", "--config", str(config), "--quant", "Q8_0", cwd=tmp_path)
    assert_clean_failure(proc, 6, tmp_path, f"{tmp_path / 'work' / 'source' / 'tiny-phimoe-F16.gguf'}: could not be "
                         "written (", "moeq wrote nothing under a final name")
    assert not (tmp_path / "work" / "source" / "tiny-phimoe-F16.gguf").exists()


def test_disk_full_while_staging_the_card(tmp_path, toolchain):
    config = pipeline(tmp_path)
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench")
    assert proc.returncode == 0, proc.stderr
    proc = _moeq_limited(8 << 10, "card", "--config", str(config), "--quant", "Q8_0", "--force", cwd=tmp_path)
    line = assert_clean_failure(proc, 6, tmp_path, "File too large")
    assert line.startswith(f"error: {tmp_path / 'work' / 'repos' / 'ladder'}/"), line  # the file, not "a file"


# ---------------------------------------------------------------- signals and processes

SIGINT_DURING_IMPORT = """
import os, signal, sys

class SigintOnImport:  # a real SIGINT at a known moment: while moeq's command line imports rich
    def find_spec(self, name, path=None, target=None):
        if name == "rich" and "moeq.cli" in sys.modules:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, SigintOnImport())
"""


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.parametrize("module", ["rich", "markdown_it"])
def test_a_signal_while_starting(tmp_path, name, code, module):
    """SIGINT or SIGTERM while the command line's modules import, or while the command is built: one line, the
    signal's exit code, no traceback."""
    hook = SIGINT_DURING_IMPORT.replace('name == "rich"', f"name == {module!r}")
    hook = hook.replace("signal.SIGINT", f"signal.{name}")
    (tmp_path / "sitecustomize.py").write_text(hook)
    proc = subprocess.run([sys.executable, "-m", "moeq", "check-config", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60,
                          preexec_fn=default_sigint)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == f"error: interrupted by {name} while starting; nothing was done\n"
    assert proc.stdout == ""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_sigkill_of_a_build_takes_its_rpc_server_with_it(tmp_path, toolchain):
    config = pipeline(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "moeq", "build", "--config", str(config), "--quant", "Q8_0"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, server = time.monotonic() + 120, None
    while server is None and time.monotonic() < deadline and proc.poll() is None:
        server = next((c for c in _children(proc.pid) if "ggml-rpc-server" in _cmdline(c)), None)
        time.sleep(0.05)
    assert server is not None, "the build never started its ggml-rpc-server"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while "ggml-rpc-server" in _cmdline(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ggml-rpc-server" not in _cmdline(server), "ggml-rpc-server outlived the build"


@pytest.mark.slow
def test_an_rpc_device_that_does_not_answer(tmp_path, toolchain):
    config = pipeline(tmp_path)
    assert run_moeq("quantize", "--config", str(config), "--quant", "Q8_0").returncode == 0
    proc = run_moeq("bench", "--config", str(config), "--quant", "Q8_0", "--modes", "gpu", "--rpc", "127.0.0.1:1")
    line = assert_clean_failure(proc, 4, tmp_path, "bench: recorded errors for Q8_0 gpu (measured: Q8_0 quality)")
    assert "the other modes were measured" not in line
    assert "gdb" not in proc.stdout + proc.stderr and "backtrace" not in proc.stdout + proc.stderr.lower()


@pytest.mark.slow
def test_sigterm_during_an_upload(tmp_path, test_hub, toolchain):
    """SIGTERM while the GGUF is uploading: exit 143 (not a Hub error), and the Hub holds nothing new."""
    from hub_server import Fault

    config = pipeline(tmp_path)
    assert run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench").returncode == 0
    test_hub.state.faults.append(Fault("PUT", r"^/lfs-upload/", "sleep", seconds=30))
    proc = subprocess.Popen([sys.executable, "-m", "moeq", "push", "--config", str(config), "--quant", "Q8_0"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **test_hub.env})
    deadline = time.monotonic() + 60
    while not any(r.method == "PUT" for r in test_hub.requests) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, out + err
    assert err.splitlines()[-1].startswith("error: interrupted by SIGTERM") and "Traceback" not in err
    assert HUB_TOKEN not in out + err
    assert sorted(test_hub.state.files("moeq-test/tiny-phimoe-GGUF")) == [".gitattributes"]  # no commit landed


def test_a_template_that_runs_away(tmp_path, toolchain):
    template = tmp_path / "card.md.j2"
    template.write_text("{{ frontmatter | card_yaml }}\n{{ 'x' * 10**10 }}\n")
    config = pipeline(tmp_path, EXAMPLE.replace("card:\n  extra:\n", f"card:\n  template: {template}\n  extra:\n"))
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench")
    assert_clean_failure(proc, 3, tmp_path, f"Q8_0: card failed: {template}:2: the template ran past its budget")


# ---------------------------------------------------------------- round 2: synth, calibration, imatrix, records

@pytest.mark.parametrize("args, code, message", [
    (["--vocab", "99999999999"], 3, "synth option vocab = 99999999999: out of range; use 1 to 1,048,576"),
    (["--layers", "100000"], 3, "synth option layers = 100000: out of range; use 1 to 256"),
    (["--layers", "0"], 3, "synth option layers = 0: out of range; use 1 to 256"),
    (["--layers", "256", "--experts", "512", "--embd", "65536", "--ff", "262144"], 6, "free some space"),
])
def test_synth_is_bounded_before_it_writes(tmp_path, args, code, message):
    out = tmp_path / "x.gguf"
    proc = run_moeq("synth", "tiny-moe", str(out), *args)
    assert_clean_failure(proc, code, tmp_path, message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_synth_hf_is_bounded(tmp_path):
    proc = run_moeq("synth", "tiny-phimoe-hf", str(tmp_path / "hf"), "--vocab", "99999999999")
    assert_clean_failure(proc, 3, tmp_path, "synth option vocab = 99999999999: out of range for a trained tokenizer; use 300")
    proc = run_moeq("synth", "tiny-phimoe-hf", str(tmp_path / "hf2"), "--layers", "256", "--experts", "512")
    assert_clean_failure(proc, 3, tmp_path, "more than a checkpoint made in memory holds")


def _calibration(tmp_path: Path, kind: str, tiny_model: Path) -> Path:
    path = tmp_path / f"calibration-{kind}"
    if kind == "empty":
        path.write_text("")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "gguf":
        path.write_bytes(tiny_model.read_bytes())
    elif kind == "huge":
        with open(path, "wb") as fh:  # sparse: no disk is used
            fh.truncate((32 << 20) + 1)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, message", [
    ("empty", "the calibration text is empty"), ("binary", "not UTF-8 text"),
    ("gguf", "a GGUF file, not a calibration text"), ("huge", "the calibration text is 33,554,433 bytes, more than 32 MiB"),
])  # a FIFO, a device or a folder: refused as the pipeline loads (test_a_text_that_is_no_regular_file_...)
def test_a_calibration_text_that_is_not_one(tmp_path, toolchain, tiny_model, kind, message):
    text = _calibration(tmp_path, kind, tiny_model)
    config = pipeline(tmp_path, EXAMPLE.replace("imatrix:                         #",
                                                f"imatrix:\n  calibration: {text}\n  #"))
    assert run_moeq("fetch", "--config", str(config)).returncode == 0
    proc = run_moeq("imatrix", "--config", str(config))
    assert_clean_failure(proc, 3, tmp_path, f"{text}: {message}", f"fix imatrix.calibration in {config}")
    assert not (tmp_path / "work" / "imatrix").exists() or not list((tmp_path / "work" / "imatrix").iterdir())
    # The build says it in one error line, and names no card or preview it never wrote.
    proc = run_moeq("build", "--config", str(config), "--quant", "Q4_K_M", "--skip-bench")
    assert_clean_failure(proc, 3, tmp_path, "imatrix failed", message)
    assert "cards:" not in proc.stdout and "previews" not in proc.stdout


@pytest.mark.slow
def test_a_huge_file_given_as_an_importance_matrix_is_not_read_whole(tmp_path, toolchain):
    """1 GiB that looks like a legacy matrix at first: refused from its first entry, under a 512 MiB data limit
    that reading it whole would break (a MemoryError, not this message)."""
    big = tmp_path / "big.imatrix"
    with open(big, "wb") as fh:
        fh.write((7).to_bytes(4, "little"))  # a legacy matrix of 7 entries, at first sight; the rest is zeros
        fh.truncate(1 << 30)
    config = pipeline(tmp_path, with_quants(f"  - {{type: Q4_K_M, imatrix: {big}}}\n"))
    assert run_moeq("fetch", "--config", str(config)).returncode == 0

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (512 << 20, 512 << 20))

    proc = subprocess.run([sys.executable, "-m", "moeq", "quantize", "--config", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, preexec_fn=limited, timeout=300)
    assert_clean_failure(proc, 3, tmp_path, f"{big}: not a readable importance matrix (ValueError: bad entry name "
                                            "length)")


def test_a_record_or_manifest_with_nan_is_refused(tmp_path, toolchain):
    config = pipeline(tmp_path)
    assert run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench").returncode == 0
    folder = tmp_path / "work" / "repos" / "ladder"
    manifest = folder / "moeq-manifest.json"
    manifest.write_text(re.sub(r'"quant_bpw": [0-9.]+', '"quant_bpw": NaN', manifest.read_text(), count=1))
    for command in (["card", "verify"], ["card", "lint", "--records", str(folder)]):
        proc = run_moeq(*command, str(folder / "README.md"))
        assert_clean_failure(proc, 3, tmp_path, f"{manifest}: not a readable records manifest", "NaN is not JSON")
    record = tmp_path / "work" / "records" / "quantize-Q8_0.json"
    record.write_text(re.sub(r'"quant_bpw": [0-9.]+', '"quant_bpw": NaN', record.read_text(), count=1))
    proc = run_moeq("card", "--config", str(config), "--force")  # the card's plan makes the file it needs again
    assert proc.returncode == 0, proc.stderr
    assert f"{record}: not a quantize record" in proc.stderr and "finite number" in proc.stderr
    assert "quantize will run again" in proc.stderr and "NaN" not in record.read_text()
    # Hostile round 3: a record the card reads if it is there (validate, bench) with a NaN was dropped as "not
    # measured", exit 0: it is an error that says which command makes it again.
    (tmp_path / "work" / "records" / "quantize-Q8_0.json").write_text(
        re.sub(r'"quant_bpw": NaN', '"quant_bpw": 8.5', record.read_text(), count=1))
    validated = tmp_path / "work" / "records" / "validate-Q8_0.json"
    validated.write_text(re.sub(r'"rel_rmse": [0-9.e-]+', '"rel_rmse": Infinity', validated.read_text(), count=1))
    proc = run_moeq("card", "--config", str(config), "--force")
    line = assert_clean_failure(proc, 3, tmp_path, f"{validated}: not a validate record", "finite number")
    assert line.endswith(f"run moeq validate --config {config} --quant Q8_0 --force"), line
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "moeq-manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    (deep / "README.md").write_text((folder / "README.md").read_text())
    for command in (["card", "verify"], ["card", "lint", "--records", str(deep)]):
        proc = run_moeq(*command, str(deep / "README.md"))
        assert_clean_failure(proc, 3, tmp_path, "nested deeper than a records manifest is")


def test_a_template_with_a_huge_range(tmp_path, toolchain):
    template = tmp_path / "card.md.j2"
    template.write_text("{{ frontmatter | card_yaml }}\n{% for i in range(10**9) %}x{% endfor %}\n")
    config = pipeline(tmp_path, EXAMPLE.replace("card:\n  extra:\n", f"card:\n  template: {template}\n  extra:\n"))
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench")
    assert_clean_failure(proc, 3, tmp_path, f"{template}:2: the template ran past its budget (a range or number "
                                            "too large")


@pytest.mark.slow
@pytest.mark.parametrize("value", ["\u00b2", "-5", "nan", "99999"])
def test_a_bad_max_wait_is_refused(tmp_path, value):
    hub_source = re.sub(r"source:\n(?:  .*\n)+", "source:\n  kind: gguf\n  repo: someone/x\n  revision: main\n"
                        "  file: x-F16.gguf\n", EXAMPLE)
    proc = run_moeq("fetch", "--config", str(pipeline(tmp_path, hub_source)),
                    env={"MOEQ_HUB_MAX_WAIT_S": value, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_x"})
    assert_clean_failure(proc, 2, tmp_path, f"MOEQ_HUB_MAX_WAIT_S={value!r}: not a wait moeq takes; use a whole "
                                            "number of seconds from 0 to 3600")


def test_usage_errors_and_early_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moeq", "build", "--bogus"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert_clean_failure(proc, 2, tmp_path, "No such option: --bogus", "see moeq build --help")
    assert "╭" not in proc.stderr
    proc = run_moeq("check-config", "--config", str(tmp_path / "missing.yaml"), "--json")
    where, problem, fix = (str(tmp_path / "missing.yaml"), "pipeline file not found",
                           "pass --config with the path to your pipeline.yaml")
    assert proc.returncode == 2 and json.loads(proc.stdout) == {
        "error": f"{where}: {problem}; {fix}", "where": where, "problem": problem, "fix": fix, "exit_code": 2}


def test_a_tool_that_goes_silent_is_stopped(tmp_path):
    """What bounds llama-quantize (toolchain.quantize_silence_s): a tool that prints nothing for idle_s."""
    from moeq.errors import ToolError
    from moeq.runner import run_tool

    started = time.monotonic()
    with pytest.raises(ToolError, match=r"sh: printed nothing for 1 s, stopped; log: "):
        run_tool(["sh", "-c", "echo start; sleep 60"], tmp_path / "silent.log", idle_s=1)
    assert time.monotonic() - started < 20
    assert (tmp_path / "silent.log").read_text().splitlines()[-1] == "start"


@pytest.mark.parametrize("key", ["imatrix.calibration", "recipe.selection", "bench.perplexity.text"])
@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_a_text_that_is_no_regular_file_is_refused_before_it_is_read(tmp_path, key, kind):
    """Hostile round 3: recipe.selection on /dev/zero or a FIFO hung `moeq recipe` (it was hashed before it was
    checked), and a folder exited 6 with "free some space". Every text is checked first, the same way."""
    text = {"fifo": tmp_path / "text.fifo", "device": Path("/dev/zero"), "folder": tmp_path / "texts"}[kind]
    if kind == "fifo":
        os.mkfifo(text)
    elif kind == "folder":
        text.mkdir()
    example = yaml.safe_load(EXAMPLE)
    section, *path = key.split(".")
    value = example.get(section) or {}
    inner = value
    for part in path[:-1]:
        inner = inner.setdefault(part, {})
    inner[path[-1]] = str(text)
    if section == "recipe":
        example["quants"] = [{"type": "Q2_K", "recipe": "search", "budget": "stock"}]
    config = pipeline_file(tmp_path, trained=False, **{section: value, "quants": example["quants"]})
    started = time.monotonic()
    proc = run_moeq("recipe" if section == "recipe" else "check-config", "--config", str(config), process=True)
    assert time.monotonic() - started < 60
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    expected = "is a folder; give a text file" if kind == "folder" else "is not a regular file (a pipe or a device)"
    assert f"{key}: {text} {expected}" in proc.stderr.strip().splitlines()[-1], proc.stderr

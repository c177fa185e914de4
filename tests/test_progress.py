"""Live progress of the llama.cpp tools inside `moeq build`: tensors quantized, chunks of every llama-imatrix and
llama-perplexity run, as bars on a terminal (a pseudo-terminal here), one line per tool run in a log, nothing
extra with --json."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time

import pytest

from moeq import progress
from moeq.runner import run_tool

from conftest import REPO, pipeline_file

MOEQ = REPO / ".venv" / "bin" / "moeq"


class Seen:
    """A reporter that keeps what it was told."""

    def __init__(self):
        self.updates, self.ended = [], []

    def update(self, task, label, done, total, unit):
        self.updates.append((label, done, total, unit))

    def end(self, task):
        self.ended.append(task)


def test_each_tool_is_metered_from_its_own_output_as_it_comes(tmp_path):
    """A real process printing as llama.cpp's tools do: the chunks of a pass on one growing line, flushed piece by
    piece, are seen before the line ends; rows of a --kl-divergence run and llama-quantize's tensors too."""
    script = tmp_path / "llama-perplexity"
    script.write_text("#!/bin/sh\n"
                      "echo 'perplexity: calculating perplexity over 3 chunks, n_ctx=256, batch_size=2048, n_seq=8'\n"
                      "printf '[1]5.1,'; sleep 0.2; printf '[2]4.9,'; sleep 0.2; printf '[3]4.8,'; echo\n"
                      "echo 'kl_divergence: computing over 2 chunks, n_ctx=256'\n"
                      "echo '   1      59.4471 ±   18.7001       0.10067'\n"
                      "echo '   2      63.8339 ±   14.9397       0.14940'\n")
    script.chmod(0o755)
    seen = Seen()
    with progress.reporting(seen), progress.step("Q2_K bench"):
        run_tool([str(script)], tmp_path / "run.log")
    assert [u[1:] for u in seen.updates] == [(0, 3, "chunks"), (1, 3, "chunks"), (2, 3, "chunks"), (3, 3, "chunks"),
                                            (0, 2, "chunks"), (1, 2, "chunks"), (2, 2, "chunks")]
    assert {u[0] for u in seen.updates} == {"Q2_K bench: llama-perplexity"} and len(seen.ended) == 1
    # the log holds the lines as the tool printed them, the growing one once, whole
    assert (tmp_path / "run.log").read_text().splitlines()[2] == "[1]5.1,[2]4.9,[3]4.8,"

    quantize = tmp_path / "llama-quantize"
    quantize.write_text("#!/bin/sh\necho '[   1/  39] output.bias  - [   512,  1], type =    f32'\n"
                        "echo '[  39/  39] token_embd.weight  - [   256,  512], type = f16'\n")
    quantize.chmod(0o755)
    seen = Seen()
    with progress.reporting(seen):
        run_tool([str(quantize)], tmp_path / "q.log")
    assert seen.updates == [("llama-quantize", 1, 39, "tensors"), ("llama-quantize", 39, 39, "tensors")]
    with progress.reporting(None):  # nobody listening: no meter at all
        assert progress.meter(["llama-quantize", "in.gguf", "out.gguf", "Q8_0"]) is None
    with progress.reporting(seen):
        assert progress.meter(["/bin/llama-quantize", "--dry-run", "in.gguf", "Q8_0"]) is None


def _in_pty(argv: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """Run `argv` with a pseudo-terminal as its stdin, stdout and stderr; its exit code and all it wrote."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: moeq on a terminal
        os.execve(argv[0], argv, env)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_build_on_a_terminal_shows_each_tools_progress_and_a_log_one_line_per_run(tmp_path, toolchain):
    """`moeq build` of one rung with an importance matrix (llama-imatrix, the choice's two llama-quantize runs and
    their llama-perplexity runs against F16, the bench's): on a terminal each of them shows a bar with its count
    and the time left; in a log, one line per tool run; with --json, none."""
    config = pipeline_file(tmp_path, trained=False, quants=[{"type": "Q2_K", "imatrix": "auto"}])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEQ_CONFIG", "COLUMNS", "LINES"))}
    env |= {"TERM": "xterm-256color", "COLUMNS": "120"}
    code, screen = _in_pty([str(MOEQ), "build", "--config", str(config), "--all"], env, timeout=900)
    assert code == 0, screen[-3000:]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)  # the terminal's control sequences
    for label, unit in (("imatrix: llama-imatrix", "chunks"), ("Q2_K-with-imatrix candidate: llama-quantize", "tensors"),
                        ("Q2_K-without-imatrix candidate: llama-quantize", "tensors"),
                        ("Q2_K choice: llama-perplexity", "chunks")):
        bars = re.findall(re.escape(label) + r"[^\n\r]*?━[^\n\r]*?(\d+)/(\d+) " + unit, text)
        assert bars, f"no bar for {label}\n{text[-3000:]}"
        assert any(done == total for done, total in bars)  # seen to the end
    assert "━" in text and re.search(r"\d:\d\d:\d\d", text)  # the bar and its times (elapsed, left)

    # in a log (stderr not a terminal): one line per tool run, then the summary; with --json no such line
    proc = subprocess.run([str(MOEQ), "build", "--config", str(config), "--all", "--force-stage", "choice"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    quantized = [line for line in lines if "llama-quantize:" in line]  # the two candidates, made again
    assert len(quantized) == 2 and all(re.fullmatch(r"Q2_K.*: llama-quantize: 39 tensors", line)
                                       for line in quantized), proc.stderr
    assert sum(line == "Q2_K choice: llama-perplexity: 64 chunks" for line in lines) == 2, proc.stderr
    assert "━" not in proc.stderr
    proc = subprocess.run([str(MOEQ), "build", "--config", str(config), "--all", "--force-stage", "choice",
                           "--json"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True, proc.stderr
    assert "llama-quantize:" not in proc.stderr and "llama-perplexity:" not in proc.stderr

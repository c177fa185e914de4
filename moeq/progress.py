"""Live progress of the llama.cpp tools moeq runs: tensors quantized, chunks evaluated.

The tools count their own work in their logs: llama-quantize prints `[  12/ 387] blk.0.attn_q.weight ...` per
tensor; llama-imatrix and llama-perplexity print `computing over N chunks` (or `calculating perplexity over N
chunks`), then `[1]5.12,[2]...` (on one line, written as each chunk ends) or, with --kl-divergence, a row per
chunk. The tool runner hands every piece of output, whole lines and the growing last line, to the meter of the
tool it runs, which reports to the command's one reporter (a bar on a terminal, a line per tool run in a log,
nothing with --json). The plan names the step a tool runs for (`step`), so a bar reads "Q4_K_M quantize:
llama-quantize".

    with reporting(reporter):                     # the CLI, for one command
        with step("Q4_K_M quantize"):             # the plan, around each step
            run_tool([...llama-quantize...], log)
    # -> reporter.update(task, "Q4_K_M quantize: llama-quantize", 12, 387, "tensors"), ..., reporter.end(task)
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from pathlib import Path
from typing import Iterator, Protocol


class Reporter(Protocol):
    def update(self, task: int, label: str, done: int, total: int | None, unit: str) -> None: ...

    def end(self, task: int) -> None: ...


_reporter: Reporter | None = None
_step: contextvars.ContextVar[str] = contextvars.ContextVar("moeq_progress_step", default="")
_tasks = iter(range(1, 1 << 62))

QUANTIZE_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
CHUNKS = re.compile(r"(?:computing|calculating perplexity) over (\d+) chunks")
CHUNK_SCORES = re.compile(r"\[(\d+)\][-+0-9.eEnaif]+,")  # [3]5.1234, : the chunks a perplexity pass has ended
KLD_ROW = re.compile(r"^\s*(\d+)\s+[-+0-9.]")  # a --kl-divergence row: the chunk number first


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Report every tool's progress to `reporter` while the block runs (None: to nobody)."""
    global _reporter
    before, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = before


@contextlib.contextmanager
def step(label: str) -> Iterator[None]:
    """Name the step the tools run for inside the block."""
    token = _step.set(label)
    try:
        yield
    finally:
        _step.reset(token)


class Meter:
    """One tool run's progress, read from its output."""

    def __init__(self, tool: str):
        self.tool, self.task = tool, next(_tasks)
        self.label = f"{_step.get()}: {tool}" if _step.get() else tool
        self.done, self.total, self.shown = 0, None, False

    def feed(self, text: str, whole: bool) -> None:
        """A line of output (`whole`), or the line being written so far."""
        if self.tool == "llama-quantize":
            match = QUANTIZE_LINE.match(text) if whole else None
            if match:
                self._report(int(match.group(1)), int(match.group(2)), "tensors")
            return
        if whole and (match := CHUNKS.search(text)):
            self._report(0, int(match.group(1)), "chunks")
            return
        if self.total is None:
            return
        scores = CHUNK_SCORES.findall(text)
        if scores:
            self._report(int(scores[-1]), self.total, "chunks")
        elif whole and (row := KLD_ROW.match(text)):
            self._report(int(row.group(1)), self.total, "chunks")

    def _report(self, done: int, total: int | None, unit: str) -> None:
        if _reporter is None or (self.shown and (done, total) == (self.done, self.total)):
            return
        self.done, self.total, self.shown = done, total, True
        _reporter.update(self.task, self.label, min(done, total or done), total, unit)

    def close(self) -> None:
        if self.shown and _reporter is not None:
            _reporter.end(self.task)


def meter(command: list[str]) -> Meter | None:
    """The meter of a run of `command` (a llama.cpp tool's), when a reporter listens; none for a --dry-run, which
    reads a header and is done before a bar could show."""
    tool = Path(command[0]).name
    if _reporter is None or tool not in ("llama-quantize", "llama-imatrix", "llama-perplexity") \
            or "--dry-run" in command:
        return None
    return Meter(tool)

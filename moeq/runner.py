"""Run one llama.cpp tool: stream its lines to a parser and a log file, fail with its own words.

A non-zero exit becomes a ToolError quoting the tail of the log and naming it. Every llama-* tool runs with
moeq's log flush at exit preloaded where its build has it (`log_flush_library`): the pinned llama.cpp leaks
its logger, and without the flush a tool can exit 0 with the last lines of its log unwritten. If moeq is
interrupted (SIGINT, or SIGTERM turned into an exception by the CLI) the tool is stopped
before the exception travels on, so no tool outlives the command that started it.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from moeq import progress
from moeq.errors import ToolError

TAIL_LINES = 3
LINE_END = re.compile(r"\r\n|\r|\n")
_PR_SET_PDEATHSIG = 1


# ggml attaches gdb to print a backtrace when a tool aborts: noise in a log that moeq quotes to people.
TOOL_ENV = {"GGML_NO_BACKTRACE": "1"}
# Built by scripts/build-llama-cpp beside the tools, from scripts/llama-cpp/moeq-log-flush.cpp.
LOG_FLUSH_LIBRARY = "libmoeq-log-flush.so"


def logs_through_common(name: str) -> bool:
    """The llama-* tools log through libllama-common's logger thread, which the log flush pauses at exit."""
    return name.startswith("llama-")


def log_flush_library(tool: Path) -> Path | None:
    """moeq's log flush at exit for `tool`: the library in the tool's own folder (as named, links not followed,
    so a folder of links to the same binaries runs them unchanged), for a tool that logs through libllama-common;
    None where there is none."""
    tool = Path(tool)
    library = tool.parent / LOG_FLUSH_LIBRARY
    return library if logs_through_common(tool.name) and library.is_file() else None


def tool_env(tool: Path | str) -> dict[str, str]:
    """The environment moeq adds for running `tool`: no gdb backtraces, and the log flush preloaded."""
    env = dict(TOOL_ENV)
    library = log_flush_library(Path(tool))
    if library is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [str(library.resolve()), os.environ.get("LD_PRELOAD", "")]))
    return env


STOPS = {signal.SIGINT, signal.SIGTERM}


def die_with_parent() -> None:  # runs in the child before exec: a killed moeq takes its tools with it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # blocked in moeq around the fork (run_tool), not in the tool
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def start_tool(command: list[str], *, env: dict[str, str] | None = None, unblock: bool = True,
               **popen) -> subprocess.Popen:
    """Start a llama.cpp tool that dies with moeq, with `tool_env` and `env` added to moeq's environment. SIGINT
    and SIGTERM wait until it is started: Python drops a KeyboardInterrupt raised while its fork handlers run
    ("Exception ignored in _releaseLock"), and a Ctrl-C in that instant would be lost. With `unblock=False` the
    caller unblocks them, once it is ready to stop the tool (run_tool, after its watchdogs are set)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
                                env={**os.environ, **tool_env(command[0]), **(env or {})}, **popen)
    except OSError as exc:
        raise ToolError(Path(command[0]).name, f"cannot start {command[0]} ({exc.strerror})",
                        "run scripts/setup") from None
    finally:
        if unblock:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@dataclass
class ToolRun:
    command: list[str]
    returncode: int
    wall_s: float
    log_path: Path


def run_tool(command: list[str], log_path: Path, on_line: Callable[[str], None] | None = None,
             env: dict[str, str] | None = None, timeout_s: float | None = None, cwd: Path | None = None,
             idle_s: float | None = None) -> ToolRun:
    """Run `command` (in `cwd`, default the current folder), writing every output line to `log_path` and handing
    it to `on_line`. `timeout_s` bounds the whole run, `idle_s` the time between two lines of output."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    name = Path(command[0]).name
    tail: deque[str] = deque(maxlen=40)
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            proc = start_tool(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                              bufsize=1, env=env, start_new_session=True, cwd=cwd, unblock=False)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        # A watchdog, so that a tool that hangs without printing is stopped too.
        timed_out = threading.Event()
        watchdog = None
        if timeout_s is not None:
            watchdog = threading.Timer(timeout_s, lambda: (timed_out.set(), stop_process(proc, group=True)))
            watchdog.daemon = True
            watchdog.start()
        last_line = [time.monotonic()]
        idle = threading.Event()
        if idle_s is not None:
            threading.Thread(target=_idle_watch, args=(proc, last_line, idle_s, idle), daemon=True).start()
        gauge = progress.meter(command)
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile is raised here
            assert proc.stdout is not None
            for line, whole in _output(proc.stdout.buffer):
                last_line[0] = time.monotonic()
                if gauge is not None:
                    gauge.feed(line, whole)
                if not whole:
                    continue
                log.write(line + "\n")
                if line.strip():
                    tail.append(line.strip())
                if on_line:
                    on_line(line)
            returncode = proc.wait()
        except BaseException:
            stop_process(proc, group=True)
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if gauge is not None:
                gauge.close()
        if timed_out.is_set():
            raise ToolError(name, f"still running after {timeout_s:.0f} s, stopped", f"log: {log_path}")
        if idle.is_set():
            raise ToolError(name, f"printed nothing for {idle_s:.0f} s, stopped", f"log: {log_path}")
    wall = time.monotonic() - started
    if returncode != 0:
        quoted = " | ".join(list(tail)[-TAIL_LINES:]) or "no output"
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exited {returncode}"
        raise ToolError(name, f"{how}: {quoted}", f"full log: {log_path}")
    return ToolRun(command=command, returncode=returncode, wall_s=wall, log_path=log_path)


def _output(stream) -> Iterator[tuple[str, bool]]:
    """A tool's output as it comes: each whole line (True), and after them the line written so far (False), which is
    how llama.cpp's tools print the chunks of a pass ("[1]5.12,[2]4.98," on one line). Decoded as UTF-8 with
    replacement; a line ends at \\n, \\r\\n or \\r, as Python's text mode splits them."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = ""
    while data := stream.read1(1 << 16):
        pending += decoder.decode(data)
        held = "\r" if pending.endswith("\r") else ""  # a \r\n may be split between two reads
        *lines, pending = LINE_END.split(pending[:len(pending) - len(held)])
        yield from ((line, True) for line in lines)
        if pending:
            yield pending, False
        pending += held
    pending += decoder.decode(b"", final=True)
    lines = LINE_END.split(pending) if pending else []
    if lines and not lines[-1]:
        lines.pop()
    yield from ((line, True) for line in lines)


def _idle_watch(proc: subprocess.Popen, last_line: list[float], idle_s: float, idle: threading.Event) -> None:
    while proc.poll() is None:
        if time.monotonic() - last_line[0] > idle_s:
            idle.set()
            stop_process(proc, group=True)
            return
        time.sleep(min(1.0, idle_s / 4))


def stop_process(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after 10 s; with `group`, to the process group the tool leads (its children too)."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()

"""Run one llama.cpp tool: stream its lines to a parser and a log file, fail with its own words.

A non-zero exit becomes a ToolError quoting the tail of the log and naming it. If moeq is
interrupted (SIGINT, or SIGTERM turned into an exception by the CLI) the tool is stopped
before the exception travels on, so no tool outlives the command that started it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moeq.errors import ToolError

TAIL_LINES = 3
_PR_SET_PDEATHSIG = 1


# ggml attaches gdb to print a backtrace when a tool aborts: noise in a log that moeq quotes to people.
TOOL_ENV = {"GGML_NO_BACKTRACE": "1"}


STOPS = {signal.SIGINT, signal.SIGTERM}


def die_with_parent() -> None:  # runs in the child before exec: a killed moeq takes its tools with it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # blocked in moeq around the fork (run_tool), not in the tool
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


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
        # SIGINT and SIGTERM wait until the tool is started: Python drops a KeyboardInterrupt raised while its fork
        # handlers run ("Exception ignored in _releaseLock"), and a Ctrl-C in that instant would be lost.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True, errors="replace", bufsize=1, env={**os.environ, **TOOL_ENV, **(env or {})},
                start_new_session=True, preexec_fn=die_with_parent, cwd=cwd,
            )
        except BaseException as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if isinstance(exc, OSError):
                raise ToolError(f"{name}: cannot start {command[0]} ({exc.strerror}); run scripts/setup") from None
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
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile is raised here
            assert proc.stdout is not None
            for line in proc.stdout:
                last_line[0] = time.monotonic()
                log.write(line)
                stripped = line.rstrip("\n")
                if stripped.strip():
                    tail.append(stripped.strip())
                if on_line:
                    on_line(stripped)
            returncode = proc.wait()
        except BaseException:
            stop_process(proc, group=True)
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if timed_out.is_set():
            raise ToolError(f"{name}: still running after {timeout_s:.0f} s, stopped; log: {log_path}")
        if idle.is_set():
            raise ToolError(f"{name}: printed nothing for {idle_s:.0f} s, stopped; log: {log_path}")
    wall = time.monotonic() - started
    if returncode != 0:
        quoted = " | ".join(list(tail)[-TAIL_LINES:]) or "no output"
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exited {returncode}"
        raise ToolError(f"{name} {how}: {quoted} (full log: {log_path})")
    return ToolRun(command=command, returncode=returncode, wall_s=wall, log_path=log_path)


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

"""How a command shows the llama.cpp tools' progress (moeq/progress.py reads it from their output): bars on a
terminal, a line per tool run off one, nothing with --json. Everything goes to stderr."""

from __future__ import annotations

import sys

from rich.console import Console


class TerminalProgress:
    """Each running tool's progress as a bar on stderr with the time left (rich), removed when the tool ends."""

    def __init__(self, err: Console):
        self.err, self.bar, self.tasks = err, None, {}

    def update(self, task: int, label: str, done: int, total: int | None, unit: str) -> None:
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                                TextColumn("{task.completed}/{task.total} {task.fields[unit]}"), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=self.err, transient=True)
            self.bar.start()
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(label, total=total, unit=unit)
        self.bar.update(self.tasks[task], completed=done, total=total, unit=unit)
        self.bar.refresh()  # at once: a step of a tiny model ends between two of rich's own refreshes

    def end(self, task: int) -> None:
        if task in self.tasks:
            self.bar.remove_task(self.tasks.pop(task))
        if not self.tasks and self.bar is not None:
            self.bar.stop()
            self.bar = None


class LogProgress:
    """Off a terminal (a CI log): one line when a tool starts counting its work, none per tensor or chunk."""

    def __init__(self):
        self.seen: set[int] = set()

    def update(self, task: int, label: str, done: int, total: int | None, unit: str) -> None:
        if task not in self.seen:
            self.seen.add(task)
            sys.stderr.write(f"{label}: {total if total is not None else 'some'} {unit}\n")

    def end(self, task: int) -> None:
        self.seen.discard(task)


def progress_reporter(as_json: bool):
    """The reporter of a command's tool progress: none with --json, a bar on a terminal, else a line per step."""
    if as_json:
        return None
    err = Console(stderr=True)
    return TerminalProgress(err) if err.is_terminal else LogProgress()

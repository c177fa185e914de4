"""The one error family of moeq.

Every failure a person can cause or fix is a MoeqError with a one-line message that names
the file, key, tool or tensor and says what to do. The CLI prints the message and exits
with the class's exit code; tracebacks are shown only with --debug.
"""

from __future__ import annotations

import signal

# The signals that end moeq as an interruption: their names and exit codes (README, "Exit codes").
SIGNAL_EXITS = {signal.SIGINT: ("SIGINT", 130), signal.SIGTERM: ("SIGTERM", 143)}


class MoeqError(Exception):
    """Base class: where it went wrong (a file, key, tool or tensor), the problem, what to do; an exit code.

    The three parts are fields, so no message can drop its fix and tests can assert on each; the one line
    printed is always "WHERE: PROBLEM; FIX".
    """

    exit_code = 1

    def __init__(self, where: object, problem: str, fix: str):
        where = str(where)
        if not (where and problem and fix):
            raise TypeError(f"{type(self).__name__} needs a where, a problem and a fix")
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.where}: {self.problem}; {self.fix}"

    def __str__(self) -> str:
        return self.message


class ConfigError(MoeqError):
    """pipeline.yaml is missing, unreadable or invalid (where: FILE:LINE: key.path)."""

    exit_code = 2


class UsageError(MoeqError):
    """A command line moeq cannot run: an option's value it refuses (`--stage-to` naming no branch it can use)."""

    exit_code = 2


class InputError(MoeqError):
    """A file given to moeq (model, record, card) is missing or not what it should be."""

    exit_code = 3


class ToolError(MoeqError):
    """A llama.cpp tool is missing, broken, or exited with an error."""

    exit_code = 4


class HubError(MoeqError):
    """The Hub refused or failed a request."""

    exit_code = 5


class ResourceError(MoeqError):
    """Not enough disk space, or an artifact is locked by another moeq process."""

    exit_code = 6


class CheckFailed(MoeqError):
    """A check command (doctor, validate, lint) ran and found problems."""

    exit_code = 7


def from_os_error(exc: OSError) -> "ResourceError":
    """What the machine refused (a full disk, a read-only folder, a name too long), as one line naming the file."""
    where = exc.filename or "a file"
    detail = exc.strerror or (exc.args[0] if exc.args else exc.__class__.__name__)
    return ResourceError(where, f"could not be written ({detail})", "free some space, or point the workspace at a "
                         "writable folder with room (moeq wrote nothing under a final name)")


class Interrupted(KeyboardInterrupt):
    """Stopped by SIGTERM (143) or SIGINT (130); partial outputs were removed.

    Not a MoeqError: an interruption is not a failure of the stage, so nothing that records failures
    (a bench mode, a build stage) may catch it; it ends the command, which records nothing.
    """

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message

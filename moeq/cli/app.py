"""The Typer app: `moeq --help` lists commands in the order they are registered (cli/__init__.py), and every
command runs under the one error boundary below.

A MoeqError (or an OSError: a full disk, a read-only folder) is one `error:` line and its exit code; with
--json, stdout says it too, once. SIGINT and SIGTERM stop the running tool (exit 130, 143). Anything else is
a bug in moeq: one line that says so, exit 70. Tracebacks only with --debug or MOEQ_DEBUG=1.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from typer._click import (
    exceptions as click_exceptions,  # typer's own copy of click: what its parser raises
)
from typer.core import TyperGroup, TyperOption

from moeq import __version__
from moeq.errors import Interrupted, MoeqError, from_os_error

state = {"debug": os.environ.get("MOEQ_DEBUG") == "1", "json": False, "printed_json": False}

INTERRUPTED = ("interrupted by {signal}; stopped the running tool and removed its partial output (a download keeps "
               "its .partial file); run the command again: a download resumes, a recipe search keeps every measurement it "
               "made, any other step starts over")


class MoeqGroup(TyperGroup):
    """The top-level command group: registration order in --help, and the error boundary around every command."""

    def list_commands(self, ctx) -> list[str]:
        return [name for name in REGISTERED if name in self.commands]

    def invoke(self, ctx):
        with error_boundary():
            return super().invoke(ctx)


def _flag_type(self, ctx):
    """Typer prints `<bool>` after every flag, as if it took a value; flags show no type."""
    return None if self.is_flag else _option_type(self, ctx)


# Patched on the class because typer makes every option a TyperOption itself (typer.Option takes no class to use
# instead); this changes only how --help shows flags.
_option_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_type

app = typer.Typer(
    name="moeq",
    cls=MoeqGroup,
    help="Quantize Mixture-of-Experts models to GGUF and publish them with model cards that tell the truth.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


REGISTERED: list[str] = []  # command names in the order register() was called


def register(name: str, command) -> None:
    """Add a command (a function) or a family of them (a Typer app) to `moeq`."""
    REGISTERED.append(name)
    if isinstance(command, typer.Typer):
        for info in command.registered_commands:
            info.help, info.short_help = info.help or _help(info.callback), info.short_help or _summary(info.callback)
            info.callback = _body(info.callback)
        if command.registered_callback is not None:
            command.registered_callback.callback = _body(command.registered_callback.callback)
        app.add_typer(command, name=name)
    else:
        app.command(name, help=_help(command), short_help=_summary(command))(_body(command))


def _help(fn) -> str | None:
    """A command's docstring with each paragraph on one line, for --help to wrap (the docstring's line breaks are
    for the code's reader; typer keeps them). A paragraph with an indented line (an example) stays as written."""
    doc = inspect.getdoc(fn)
    if not doc:
        return None
    return "\n\n".join(p if any(line.startswith(" ") for line in p.splitlines()) else " ".join(p.split())
                       for p in doc.split("\n\n"))


def _summary(fn) -> str | None:
    """A command's first paragraph, for the list of commands."""
    doc = _help(fn)
    return doc.split("\n\n")[0] if doc else None


def _body(fn):
    """A command's function, which takes over SIGINT and SIGTERM as it starts: until then (importing, building
    the command, parsing, --help) they end moeq "while starting" (__main__)."""

    @functools.wraps(fn)
    def body(*args, **kwargs):
        from moeq import progress
        from moeq.cli.progress_view import progress_reporter

        _command_signals()
        with progress.reporting(progress_reporter(state["json"])):
            return fn(*args, **kwargs)

    return body


def note_json(value: bool) -> bool:
    """--json's callback: the error boundary says an error on stdout too when the command was asked for JSON."""
    state["json"] = state["json"] or bool(value)
    return value


@contextmanager
def error_boundary():
    """Turn what a command raises into one `error:` line and its exit code."""
    state.update(json=False, printed_json=False)
    try:
        yield
    except (click_exceptions.ClickException, typer.Exit, typer.Abort):
        raise  # usage errors and exits: __main__ says them
    except (MoeqError, OSError) as exc:
        if state["debug"]:
            traceback.print_exc()
        error = from_os_error(exc) if isinstance(exc, OSError) else exc
        sys.stderr.write(f"error: {error.message}\n")
        if state["json"] and not state["printed_json"]:
            sys.stdout.write(json.dumps({"error": error.message, "where": error.where, "problem": error.problem,
                                         "fix": error.fix, "exit_code": error.exit_code}, indent=2) + "\n")
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM as Interrupted
        message = exc.message if isinstance(exc, Interrupted) else INTERRUPTED.format(signal="SIGINT")
        sys.stderr.write(f"error: {message}\n")
        raise typer.Exit(exc.exit_code if isinstance(exc, Interrupted) else 130) from None
    except Exception as exc:  # a bug in moeq: say so plainly, keep the traceback for --debug
        if state["debug"]:
            traceback.print_exc()
        sys.stderr.write(f"error: internal error {exc.__class__.__name__}: {exc} "
                         "(rerun with --debug for the traceback and report it)\n")
        raise typer.Exit(70) from None


def _sigterm_to_exception(signum, frame) -> None:
    raise Interrupted(INTERRUPTED.format(signal="SIGTERM"), exit_code=143)


def _command_signals() -> None:
    """Once a command starts, SIGINT and SIGTERM stop its tools and remove partial files (an Interrupted): in the
    `moeq` process only, whose entry point (__main__) set its start-up handlers; a program that calls the CLI
    keeps its own."""
    if getattr(signal.getsignal(signal.SIGTERM), "moeq_starting", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _sigterm_to_exception)


def _version_callback(value: bool) -> None:
    if value:
        print(f"moeq {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version_callback,
                                                    is_eager=True, help="Print the moeq version.")] = None,
) -> None:
    state["debug"] = debug or os.environ.get("MOEQ_DEBUG") == "1"

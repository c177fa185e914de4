"""What every command shares: the Typer app, the console, the error guard and small renderers.

Errors are MoeqError subclasses; every command runs under `guard`, which prints the
one-line message, exits with the error's code, and shows a traceback only with --debug.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup, TyperOption

from moeq import __version__
from moeq.errors import ConfigError, Interrupted, MoeqError, from_os_error

# `moeq --help` lists the commands in the order a user meets them, not in the order modules register them.
COMMAND_ORDER = ("build", "fetch", "imatrix", "quantize", "validate", "bench", "card", "push", "plan", "check-config",
                 "doctor", "synth")
DEFAULT_CONFIG = Path("pipeline.yaml")


class _OrderedGroup(TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))


def _flag_type(self, ctx):
    """Typer prints `<bool>` after every flag, as if it took a value; flags show no type."""
    return None if self.is_flag else _option_type(self, ctx)


_option_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_type

app = typer.Typer(
    name="moeq",
    cls=_OrderedGroup,
    help="Quantize Mixture-of-Experts models to GGUF and publish them with model cards that tell the truth.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
synth_app = typer.Typer(help="Make synthetic models for demos and tests.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")

console = Console()
_state = {"debug": os.environ.get("MOEQ_DEBUG") == "1"}

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="Path to pipeline.yaml (default: "
                                                     "$MOEQ_CONFIG, else ./pipeline.yaml).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
SwitchLayoutOption = Annotated[bool, typer.Option("--switch-layout", help="Publish in the pipeline's hub.layout "
                                                 "although this workspace or the Hub repo used the other one.")]
QuantsOption = Annotated[Optional[list[str]], typer.Option("--quant", "-q", help="Quant type(s) of the ladder "
                                                           "(default: all).")]


def guard(fn: Callable) -> Callable:
    """Turn MoeqError into a one-line message and its exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _state["printed_json"] = False
        try:
            _command_signals()
            return fn(*args, **kwargs)
        except (MoeqError, OSError) as exc:  # an OSError is what the machine refused: a full disk, a read-only folder
            if _state["debug"]:
                traceback.print_exc()
            error = from_os_error(exc) if isinstance(exc, OSError) else exc
            sys.stderr.write(f"error: {error.message}\n")
            if kwargs.get("as_json") and not _state.get("printed_json"):  # --json: stdout says it too, once
                print_json({"error": error.message, "exit_code": error.exit_code})
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM as Interrupted
            message = exc.message if isinstance(exc, Interrupted) else INTERRUPTED.format(signal="SIGINT")
            sys.stderr.write(f"error: {message}\n")
            raise typer.Exit(exc.exit_code if isinstance(exc, Interrupted) else 130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # a bug in moeq: say so plainly, keep the traceback for --debug
            if _state["debug"]:
                traceback.print_exc()
            sys.stderr.write(f"error: internal error {exc.__class__.__name__}: {exc} "
                             "(rerun with --debug for the traceback and report it)\n")
            raise typer.Exit(70) from None

    return wrapper


INTERRUPTED = ("interrupted by {signal}; stopped the running tool and removed its partial output (a download keeps "
               "its .partial file); run the command again: a download resumes, any other step starts over")


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
    _state["debug"] = debug or os.environ.get("MOEQ_DEBUG") == "1"


def pipeline_from(config: Path | None):
    """The pipeline named by --config, else $MOEQ_CONFIG, else ./pipeline.yaml.

    Once it loads, the first line of output (on stderr, so --json stays clean) says which file that was;
    a file that does not load is named by its error.
    """
    from moeq.config import load_pipeline

    if config is not None:
        path, why = config, "--config"
    elif os.environ.get("MOEQ_CONFIG"):
        path, why = Path(os.environ["MOEQ_CONFIG"]), "MOEQ_CONFIG"
    else:
        path, why = DEFAULT_CONFIG, "default"
        if not path.is_file():
            raise ConfigError(f"{path.resolve()}: no pipeline file here; pass --config PATH, set MOEQ_CONFIG, "
                              "or run moeq in the folder that holds pipeline.yaml")
    pipeline = load_pipeline(path)
    sys.stderr.write(f"pipeline: {path} ({why})\n")
    return pipeline


def say(message: str) -> None:
    """Progress and warnings: stderr, so --json output stays clean."""
    sys.stderr.write(message + "\n")


def open_context(config: Path | None):
    """The one context of a command: the pipeline (--config, $MOEQ_CONFIG, ./pipeline.yaml), its workspace,
    records, tools and Hub client, with progress going to stderr."""
    from moeq.steps import Context

    return Context.of(pipeline_from(config), say=say)


def print_json(data: object) -> None:
    """The command's result on stdout (a command that printed it, then failed, prints no second document)."""
    _state["printed_json"] = True
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def selected_quants(pipeline, names: list[str] | None) -> list:
    """The quants named on the command line, or the whole ladder."""
    return [pipeline.quant(q) for q in names] if names else list(pipeline.quants)

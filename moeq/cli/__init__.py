"""The `moeq` command line: parse, call one library function, render the result.

Errors are MoeqError subclasses; every command runs under `guard`, which prints the
one-line message, exits with the error's code, and shows a traceback only with --debug.
"""

from moeq.cli import cards, hub, stages  # noqa: F401  (registers the commands)
from moeq.cli.common import app

__all__ = ["app"]

"""`moeq` on the command line (and `python -m moeq`).

The one entry point: until a command's body starts, SIGINT and SIGTERM end moeq with one line ("while
starting; nothing was done") and 130 or 143, whatever moment they arrive at (importing, building the
command, parsing); a command then runs under the error boundary (cli/app.py), and a usage error is one `error:`
line with exit 2.
"""

import signal
import sys

from moeq.errors import SIGNAL_EXITS


def _while_starting(signum, frame) -> None:
    name, code = SIGNAL_EXITS[signum]
    sys.stderr.write(f"error: interrupted by {name} while starting; nothing was done\n")
    raise SystemExit(code)


_while_starting.moeq_starting = True  # the error boundary swaps it for the command's own handlers (cli/app.py)


def main() -> None:
    for signum in SIGNAL_EXITS:
        signal.signal(signum, _while_starting)
    import typer
    import typer.main
    from typer._click import exceptions as parsing  # typer's own copy of click: what its parser raises

    from moeq.cli import app

    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="moeq", standalone_mode=False)
    except parsing.NoArgsIsHelpError as exc:
        exc.show()
        code = exc.exit_code
    except parsing.ClickException as exc:
        where = exc.ctx.command_path if getattr(exc, "ctx", None) else "moeq"
        sys.stderr.write(f"error: {exc.format_message()}; see {where} --help\n")
        code = exc.exit_code
    except typer.Abort:
        sys.stderr.write("error: aborted; nothing was done\n")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

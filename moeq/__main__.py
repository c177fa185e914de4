"""`moeq` on the command line (and `python -m moeq`).

The command line's modules are imported here, inside a guard: a Ctrl-C while they load ends with the
same one-line message and exit code as one during a command, not with a traceback.
"""

import sys


def main() -> None:
    try:
        from moeq.cli import app
        from moeq.cli.common import stop_on_sigterm
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted by SIGINT while starting; nothing was done\n")
        sys.exit(130)
    stop_on_sigterm()
    app(prog_name="moeq")


if __name__ == "__main__":
    main()

"""`bianzhi`: run the platform on one machine and talk to it.

Expected errors are one line on stderr (``bianzhi: error: …``) and exit status 2; Ctrl-C exits
130 without a traceback. Set ``BIANZHI_DEBUG=1`` to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from services.cli.common import CliError, configure_cli_logging

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block) and never exit by itself."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see `{self.prog} --help`)")


# Each command and the module (of ``services.cli``) that registers and runs it, in the order
# `bianzhi --help` lists them. A command line naming one imports that module only: the modules
# of the platform's own processes (SQLAlchemy, FastStream, Alembic) cost a second to import,
# which `bianzhi report` or `bianzhi send` need not pay.
COMMANDS: dict[str, str] = {
    "up": "up",
    "send": "send",
    "tail": "tail",
    "replay": "replay",
    "migrate": "migrate",
    "keys": "keys",
    "report": "report",
    "check": "check",
    "audit": "audit",
    "import": "importer",
    "demo": "demo",
    "deliveries": "deliveries",
}


def build_parser(argv: Sequence[str] | None = None) -> Parser:
    """The parser of ``argv``'s command alone when it names one, else of every command."""
    parser = Parser(
        prog="bianzhi",
        description="Run the bianzhi platform on one machine and talk to it.",
        epilog="Set BIANZHI_DEBUG=1 to see the traceback of an unexpected failure.",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    named = next((a for a in argv or () if not a.startswith("-")), None)
    wanted = [COMMANDS[named]] if named in COMMANDS else list(COMMANDS.values())
    for module in wanted:
        importlib.import_module(f"services.cli.{module}").register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        args = build_parser(argv).parse_args(argv)
        configure_cli_logging(getattr(args, "log_level", None) or "INFO")
        status: int = args.run(args)
        return status
    except CliError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`bianzhi tail … | head`): not an error; keep Python from
        # complaining again when it flushes stdout at exit.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        if os.environ.get("BIANZHI_DEBUG"):
            traceback.print_exc()
        reason = " ".join(str(exc).split())
        _print_error(
            f"unexpected {type(exc).__name__}{': ' + reason if reason else ''}"
            " (set BIANZHI_DEBUG=1 for the traceback)"
        )
        return 1


def _print_error(message: str) -> None:
    sys.stderr.write(f"bianzhi: error: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())

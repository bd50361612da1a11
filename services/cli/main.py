"""`bianzhi`: run the platform on one machine and talk to it.

Expected errors are one line on stderr (``bianzhi: error: …``) and exit status 2; Ctrl-C exits
130 without a traceback. Set ``BIANZHI_DEBUG=1`` to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from services.cli import (
    audit,
    check,
    deliveries,
    demo,
    importer,
    keys,
    migrate,
    replay,
    report,
    send,
    tail,
    up,
)
from services.cli.common import CliError, configure_cli_logging

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (no usage block) and never exit by itself."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> Parser:
    parser = Parser(
        prog="bianzhi",
        description="Run the bianzhi platform on one machine and talk to it.",
        epilog="Set BIANZHI_DEBUG=1 to see the traceback of an unexpected failure.",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )
    for module in (
        up,
        send,
        tail,
        replay,
        migrate,
        keys,
        report,
        check,
        audit,
        importer,
        demo,
        deliveries,
    ):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
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

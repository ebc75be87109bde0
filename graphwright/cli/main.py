"""``graphwright`` command line: demo, compile, inspect, generate, export, eval, bench, steer, heads, tune.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args)``.
User errors never print a traceback: a bad option value is argparse's one-line error (exit 2;
numeric options are range-checked at parse time, output paths checked before any model loads);
errors graphwright raises on purpose (bad recipe, bad model, bad input) and OS errors (a path
that is a directory, a full disk) print ``error: <message>`` on stderr and exit 2; anything else
(``RuntimeError`` from torch on odd input, ``RecursionError``, ``MemoryError``) prints one line
naming its type and exits 1 (``GRAPHWRIGHT_TRACEBACK=1`` re-raises it to show the traceback).
Tested over every option of every subcommand in ``tests/cli/test_cli_options.py``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("demo", "compile", "inspect", "generate", "export", "eval", "bench",
            "steer", "heads", "tune")  # steer: PASTA head profiling; heads: retrieval/streaming KV-head profiling


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block); subcommand parsers inherit it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="graphwright", description="A compiler for pretrained transformer LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"graphwright.cli.cmd_{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    from ..errors import GraphwrightError
    from .common import print_error

    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(f"graphwright.cli.cmd_{args.command}").run(args) or 0
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except (GraphwrightError, ValueError, OSError, NotImplementedError) as exc:
        print_error(_one_line(exc) if isinstance(exc, OSError) else exc)
        return 2
    except Exception as exc:  # noqa: BLE001  (RuntimeError, RecursionError, MemoryError...: one line, never a traceback)
        if os.environ.get("GRAPHWRIGHT_TRACEBACK"):
            raise
        print_error(f"{type(exc).__name__}: {_one_line(exc)} (set GRAPHWRIGHT_TRACEBACK=1 to see where)")
        return 1


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    text = " ".join(str(exc).split())
    return text[:500] + (" ..." if len(text) > 500 else "") or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

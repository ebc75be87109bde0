"""``graphwright`` command line: demo, compile, inspect, generate, export, eval, bench.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args)``.
Errors graphwright raises on purpose (bad recipe, bad model, bad input) print one clear line
and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "compile", "inspect", "generate", "export", "eval", "bench",
            "steer")  # steer: PASTA head profiling and held-out accuracy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphwright", description="A compiler for pretrained transformer LLMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"graphwright.cli.cmd_{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    from ..errors import GraphwrightError

    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(f"graphwright.cli.cmd_{args.command}").run(args) or 0
    except (GraphwrightError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        from .common import print_error

        print_error(exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What both console scripts share: sub-command modules and one-line error reporting."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType

from stargzfs.errors import StargzfsError


def build_parser(prog: str, description: str, version: str, modules: Iterable[ModuleType]) -> argparse.ArgumentParser:
    """A parser whose sub-commands come from modules exposing register(subparsers)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in modules:
        module.register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Expected failures become one line on stderr and their documented exit code."""
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StargzfsError as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `stargzfs-image inspect B ls / | head`: the reader left; exit like SIGPIPE would,
        # without a traceback, and keep the interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141

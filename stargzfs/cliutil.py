"""What the console scripts share: sub-command modules, one-line errors, common options."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType

from stargzfs.errors import StargzfsError


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def add_registry_options(
    parser: argparse.ArgumentParser, *, timeout: float, retries: int, timeout_aliases: Sequence[str] = ()
) -> None:
    """--insecure-registry, --registry-timeout and --registry-retries, the same for every command."""
    parser.add_argument(
        "--insecure-registry", metavar="HOST", action="append", default=[],
        help="talk plain HTTP to HOST[:PORT] (repeatable; localhost and private IPs need not be listed)",
    )
    parser.add_argument(
        "--registry-timeout", *timeout_aliases, dest="registry_timeout", metavar="SECONDS",
        type=positive_seconds, default=timeout,
        help="seconds to wait for a registry answer and for each gap in its body, per attempt "
        f"(default {timeout:g}); a slow link only needs data to keep flowing",
    )
    parser.add_argument(
        "--registry-retries", metavar="N", type=non_negative_int, default=retries,
        help=f"extra attempts after a failed registry request (default {retries})",
    )


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
    except MemoryError:
        # e.g. a builder under the mount's RLIMIT_AS given a TOC built to exhaust memory
        print(f"{parser.prog} {args.command}: out of memory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `stargzfs-image inspect B ls / | head`: the reader left; exit like SIGPIPE would,
        # without a traceback, and keep the interpreter's final flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141

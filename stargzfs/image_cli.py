"""`stargzfs-image`: a pure-Python drop-in for the nydus-image v2.1 CLI subset stargzfs uses.

Each sub-command is a module in stargzfs/image_commands/ with register(subparsers).
Exit codes: 0 ok, 1 generic failure, 2 usage, 5 malformed input, 6 unsupported input
(see stargzfs.errors).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from stargzfs import __version__
from stargzfs.errors import StargzfsError

SUBCOMMANDS = ("create", "merge", "check", "inspect", "materialize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stargzfs-image", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version", action="version", version=f"stargzfs-image {__version__} (nydus-image v2.1 compatible)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"stargzfs.image_commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StargzfsError as exc:
        print(f"stargzfs-image {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""`stargzfs-image`: a pure-Python drop-in for the nydus-image v2.1 CLI subset stargzfs uses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stargzfs import __version__
from stargzfs.errors import StargzfsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stargzfs-image", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stargzfs-image {__version__}")
    parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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

"""`stargzfs` command: one sub-command module per job (see stargzfs/commands/)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from stargzfs import __version__
from stargzfs.commands import mount, status, toc
from stargzfs.errors import StargzfsError

SUBCOMMANDS = (toc, status, mount)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stargzfs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stargzfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StargzfsError as exc:
        print(f"stargzfs {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    logging.basicConfig()
    sys.exit(main())

"""`stargzfs-image merge` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser("merge", help="not implemented yet")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("stargzfs-image merge: not implemented yet")

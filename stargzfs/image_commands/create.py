"""`stargzfs-image create` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser("create", help="not implemented yet")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise SystemExit("stargzfs-image create: not implemented yet")

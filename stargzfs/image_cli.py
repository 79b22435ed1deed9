"""`stargzfs-image`: a pure-Python drop-in for the nydus-image v2.1 CLI subset stargzfs uses.

Each sub-command is a module in stargzfs/image_commands/ with register(subparsers).
Exit codes: 0 ok, 1 generic failure, 2 usage, 5 malformed input, 6 unsupported input,
7 verification failure (see stargzfs.errors).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from stargzfs import __version__, cliutil

#: command name -> module in stargzfs/image_commands/
SUBCOMMANDS = {name: name.replace("-", "_") for name in ("create", "merge", "check", "inspect", "materialize", "blob-index")}


def _requested(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line, if any (the top level has no valued options)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Only the requested sub-command's module is imported when `argv` names one:
    `create` then never loads trio/httpx (materialize) — start-up time counts in the
    snapshotter's per-layer budget. `--help` and unknown commands still list them all."""
    requested = _requested(sys.argv[1:] if argv is None else argv)
    names = (requested,) if requested else tuple(SUBCOMMANDS)
    modules = [importlib.import_module(f"stargzfs.image_commands.{SUBCOMMANDS[name]}") for name in names]
    return cliutil.build_parser(
        "stargzfs-image",
        __doc__.splitlines()[0],
        f"stargzfs-image {__version__} (nydus-image v2.1 compatible)",
        modules,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run(build_parser(argv), argv)


if __name__ == "__main__":
    sys.exit(main())

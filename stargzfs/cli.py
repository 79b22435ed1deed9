"""`stargzfs` command: one sub-command module per job (see stargzfs/commands/)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stargzfs import __version__, cliutil
from stargzfs.commands import mount, mount_image, status, toc

SUBCOMMANDS = (toc, status, mount, mount_image)


def build_parser() -> argparse.ArgumentParser:
    return cliutil.build_parser("stargzfs", __doc__, f"stargzfs {__version__}", SUBCOMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

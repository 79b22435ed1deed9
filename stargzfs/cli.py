"""`stargzfs` command: one sub-command module per job (see stargzfs/commands/)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stargzfs import __version__, cliutil

#: command name -> the module that registers it
SUBCOMMANDS = {
    "toc": "stargzfs.commands.toc",
    "status": "stargzfs.commands.status",
    "mount": "stargzfs.commands.mount",
    "umount": "stargzfs.commands.mount",
    "mount-image": "stargzfs.commands.mount_image",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    return cliutil.build_lazy_parser("stargzfs", __doc__, f"stargzfs {__version__}", SUBCOMMANDS, argv)


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run(build_parser(argv), argv)


if __name__ == "__main__":
    sys.exit(main())

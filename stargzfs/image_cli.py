"""`stargzfs-image`: a pure-Python drop-in for the nydus-image v2.1 CLI subset stargzfs uses.

Each sub-command is a module in stargzfs/image_commands/ with register(subparsers).
Exit codes: 0 ok, 1 generic failure, 2 usage, 5 malformed input, 6 unsupported input,
7 verification failure (see stargzfs.errors).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NoReturn

from stargzfs import __version__, cliutil

PROG = "stargzfs-image"
#: command name -> the module that registers it
SUBCOMMANDS = {
    name: f"stargzfs.image_commands.{name.replace('-', '_')}"
    for name in ("create", "merge", "check", "inspect", "materialize", "blob-index")
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    return cliutil.build_lazy_parser(
        PROG, __doc__.splitlines()[0], f"stargzfs-image {__version__} (nydus-image v2.1 compatible)",
        SUBCOMMANDS, argv,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run(build_parser(argv), argv)


def console_main() -> NoReturn:
    """The console script: as `sys.exit(main())`, minus freeing the built image at exit."""
    cliutil.exit_without_teardown()
    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors
        if exc.code is None or isinstance(exc.code, int):
            cliutil.exit_now(exc.code or 0, PROG)
        raise  # a message as the code: let the interpreter print it
    cliutil.exit_now(code, PROG)


if __name__ == "__main__":
    console_main()

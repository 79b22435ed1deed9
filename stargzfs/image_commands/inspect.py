"""`stargzfs-image inspect B {stats|ls PATH|stat PATH|blobs|chunks PATH} [--json]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stargzfs.errors import UsageError
from stargzfs.rafs.inspect import COMMANDS, inspect_bootstrap, render_text


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser("inspect", help="show stats, directories, inodes, blobs or chunks of a bootstrap")
    parser.add_argument("bootstrap", help="RAFS v6 bootstrap")
    parser.add_argument("what", choices=COMMANDS, help="what to show")
    parser.add_argument("path", nargs="?", help="path inside the image (ls, stat, chunks)")
    parser.add_argument("--json", action="store_true", help="JSON instead of text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        data = Path(args.bootstrap).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read bootstrap {args.bootstrap!r}: {exc.strerror}") from None
    result = inspect_bootstrap(data, args.what, args.path)
    print(json.dumps(result, indent=2) if args.json else render_text(args.what, result))
    return 0

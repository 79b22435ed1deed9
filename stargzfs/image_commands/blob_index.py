"""`stargzfs-image blob-index`: what lazy serving needs from a TOC (digests, prefetch), parsed once.

The mount runs this in a capped subprocess the first time a blob is opened (the TOC is
untrusted input); see stargzfs.lazyblobs.index for the output's layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stargzfs.atomicio import write_atomically
from stargzfs.errors import UsageError
from stargzfs.estargz.toc import parse_toc
from stargzfs.rafs.blobindex import build


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "blob-index", help="chunk digests and prefetch set of a layer, for lazy blob serving (stargzfs extension)"
    )
    parser.add_argument("--toc", required=True, type=Path, help="the layer's TOC (stargz.index.json)")
    parser.add_argument("--blob-meta", required=True, type=Path, help="the blob.meta create wrote for it")
    parser.add_argument("-o", "--output", required=True, type=Path, help="index file to write")
    parser.set_defaults(func=run)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def run(args: argparse.Namespace) -> int:
    index = build(parse_toc(_read(args.toc, "TOC")), _read(args.blob_meta, "blob.meta"))
    write_atomically(args.output, index.encode(), mode=0o440)
    return 0

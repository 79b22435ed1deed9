"""`stargzfs-image create`: nydus-image v2.1's stargz_index conversion (rafs-v6 §1).

Accepts exactly the seed's argument list, flags in any order:
`create --source-type stargz_index --bootstrap OUT --blob-id HEX --repeatable --disable-check
--fs-version 6 --chunk-size 0x400000 --blob-meta META TOC`, plus `--compressor gzip|zstd`.
Outputs appear complete or not at all (temp file in the same directory, fsync, rename).
"""

from __future__ import annotations

import argparse
import mmap
import sys
from pathlib import Path

from stargzfs import cliutil
from stargzfs.atomicio import AtomicFile, discard_output, open_output, write_files_atomically
from stargzfs.errors import StargzfsError, UsageError
from stargzfs.gcpause import paused_gc
from stargzfs.rafs.build import COMPRESSORS, BuildResult, build_bootstrap_from_toc_file


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser("create", help="build a RAFS v6 bootstrap (+ blob.meta) from an eStargz TOC")
    parser.add_argument("--source-type", help="must be stargz_index")
    parser.add_argument("--bootstrap", required=True, help="output bootstrap file")
    parser.add_argument("--blob-id", required=True, help="layer digest hex (64 chars)")
    parser.add_argument("--repeatable", action="store_true", help="uid/gid 0, no explicit-uid/gid flag (v2.1)")
    parser.add_argument("--disable-check", action="store_true", help="skip validating the result")
    parser.add_argument("--fs-version", default="6", help="only 6 is supported")
    parser.add_argument("--chunk-size", default="0x400000", help="hex, power of two, 0x1000..0x1000000")
    parser.add_argument("--blob-meta", help="write the v2.1 blob.meta here (only when the layer has data)")
    parser.add_argument("--blob-index", help="also write the lazy-serving index of the blob.meta here "
                        "(what `blob-index` makes; stargzfs extension, only when the layer has data)")
    parser.add_argument("--compressor", default="gzip", choices=COMPRESSORS,
                        help="layer compression (stargzfs extension; zstd for zstd:chunked eStargz)")
    parser.add_argument("source", help="the TOC JSON (stargz.index.json)")
    parser.set_defaults(func=run)


def parse_chunk_size(text: str) -> int:
    """v2.1 parses hex with or without the 0x prefix."""
    digits = text[2:] if text.lower().startswith("0x") else text
    try:
        return int(digits, 16)
    except ValueError:
        raise UsageError(f"--chunk-size {text!r} is not a hexadecimal number") from None


def run(args: argparse.Namespace) -> int:
    # The cyclic GC stays off for the whole command, not only inside the build: re-enabled
    # in between, it would scan every TOC entry and tree node once more (~5% of the run).
    with paused_gc():
        return _create(args)


def _create(args: argparse.Namespace) -> int:
    if args.source_type != "stargz_index":
        raise UsageError(f"--source-type {args.source_type!r} is not supported (only stargz_index)")
    if args.fs_version != "6":
        raise UsageError(f"--fs-version {args.fs_version!r} is not supported (only RAFS v6)")
    if args.blob_index is not None and not args.blob_meta:
        raise UsageError("--blob-index needs --blob-meta (the index is only valid with that blob.meta)")
    chunk_size = parse_chunk_size(args.chunk_size)
    source = Path(args.source)
    if not source.is_file():
        raise UsageError(f"TOC {str(source)!r} is not a regular file")
    # The bootstrap is written straight into its temp file through a shared mapping: a
    # 1M-entry image is 190 MB that would otherwise sit in this process until written.
    bootstrap = open_output(Path(args.bootstrap))
    result: BuildResult | None = None
    try:
        result = build_bootstrap_from_toc_file(
            source,
            blob_id=args.blob_id,
            chunk_size=chunk_size,
            repeatable=args.repeatable,
            compressor=args.compressor,
            blob_index=args.blob_index is not None,
            allocate=bootstrap.map,
        )
        _check_and_write(args, result, bootstrap)
        cliutil.keep_until_exit(result)  # the tree: freeing it would be the last 3-5% of the run
    except BaseException:
        discard_output(bootstrap)
        raise
    finally:
        if result is not None and isinstance(result.bootstrap, mmap.mmap):
            result.bootstrap.close()
    return 0


def _check_and_write(args: argparse.Namespace, result: BuildResult, bootstrap: AtomicFile) -> None:
    if not args.disable_check:
        from stargzfs.rafs.check import check_bootstrap  # not on the --disable-check path (start-up time)

        report = check_bootstrap(result.bootstrap, {0: result.blob_meta} if result.blob_meta else {})
        if not report.ok:
            raise StargzfsError(f"built bootstrap failed its check: {report.errors[0]}")
    outputs = []
    if args.blob_meta and result.blob_meta is not None:
        outputs.append((Path(args.blob_meta), result.blob_meta))
    if args.blob_index and result.blob_index is not None:
        outputs.append((Path(args.blob_index), result.blob_index))
    elif args.blob_index and result.blob_index_problem is not None:
        print(f"stargzfs-image: warning: no blob index written: {result.blob_index_problem}", file=sys.stderr)
    if isinstance(result.bootstrap, mmap.mmap):
        bootstrap.sync_mapping(result.bootstrap)
    outputs.append(bootstrap)  # last: a present bootstrap means the other outputs are there
    write_files_atomically(outputs)

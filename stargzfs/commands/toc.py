"""`stargzfs toc REF DIGEST`: is this layer eStargz, and what is its TOC?

Exit 0 with the TOC (or a summary), 3 when the layer is a plain one, other codes from
stargzfs.errors. The same two-request detection path the filesystem uses, so this is
also the tool to debug a layer the snapshotter refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import trio

from stargzfs.errors import StargzfsError
from stargzfs.estargz.fetch import DEFAULT_MAX_TOC_SIZE, DEFAULT_TAIL_SIZE, TocResult, fetch_toc
from stargzfs.registry import RegistryClient, RegistryConfig

OUTPUT_MODE = 0o644


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "toc",
        help="detect an eStargz layer and fetch its TOC (stargz.index.json)",
        description="Detect whether a registry blob is eStargz and fetch its TOC in at most two "
        "range requests. Exit 0 ok, 3 not eStargz, 4 registry error, 5 malformed, "
        "6 unsupported, 7 digest mismatch.",
    )
    parser.add_argument("ref", metavar="REF", help="image reference the blob belongs to, e.g. host/repo:tag")
    parser.add_argument("digest", metavar="DIGEST", help="layer blob digest, sha256:<hex>")
    parser.add_argument(
        "-o", "--output", metavar="FILE",
        help="write the TOC JSON verbatim to FILE ('-' for stdout) instead of printing a summary",
    )
    parser.add_argument(
        "--toc-digest", metavar="D",
        help="expected sha256 of the TOC JSON (the containerd.io/snapshot/stargz/toc.digest label)",
    )
    parser.add_argument(
        "--insecure-registry", metavar="HOST", action="append", default=[],
        help="talk plain HTTP to HOST[:PORT] (repeatable; localhost and private IPs need not be listed)",
    )
    parser.add_argument(
        "--tail-size", metavar="N", type=_positive_int, default=DEFAULT_TAIL_SIZE,
        help=f"bytes read from the blob's end in the first request (default {DEFAULT_TAIL_SIZE})",
    )
    parser.add_argument(
        "--max-toc-size", metavar="N", type=_positive_int, default=DEFAULT_MAX_TOC_SIZE,
        help=f"refuse TOCs larger than N bytes, compressed or not (default {DEFAULT_MAX_TOC_SIZE})",
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=float, default=15.0,
        help="per-request timeout in seconds (default 15)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = trio.run(_fetch, args)
    if args.output is None:
        print(summary(args.digest, result))
    elif args.output == "-":
        sys.stdout.buffer.write(result.raw)
        sys.stdout.buffer.flush()
    else:
        write_atomically(Path(args.output), result.raw)
    return 0


async def _fetch(args: argparse.Namespace) -> TocResult:
    config = RegistryConfig(insecure_hosts=tuple(args.insecure_registry), timeout=args.timeout)
    async with RegistryClient(config) as client:
        reader = client.blob(args.ref, args.digest)
        return await fetch_toc(
            reader,
            tail_size=args.tail_size,
            max_toc_size=args.max_toc_size,
            expected_digest=args.toc_digest,
        )


def summary(layer_digest: str, result: TocResult) -> str:
    footer = result.footer
    requests = f"{result.requests} request" + ("s" if result.requests != 1 else "")
    return (
        f"{layer_digest}: {footer.kind} ({footer.compression}), {len(result.toc.entries)} entries, "
        f"TOC {len(result.raw)} bytes ({footer.toc_compressed_size} compressed at offset "
        f"{footer.toc_offset}), {result.toc.digest}, {requests}, {result.bytes_fetched} bytes fetched"
    )


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the target directory + rename: readers never see a partial TOC."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        handle = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    except OSError as exc:
        raise StargzfsError(f"cannot write {path}: {exc.strerror or exc}") from None
    temp = Path(handle.name)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, OUTPUT_MODE & ~_umask())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise StargzfsError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current

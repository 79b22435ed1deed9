"""`stargzfs-image materialize`: the uncompressed blob cache for a bootstrap's `device=`.

With the output a bootstrap mounts with the kernel's erofs and no nydusd:
`mount(BOOT, MNT, "erofs", MS_RDONLY, "device=/abs/DEV")`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from stargzfs import cliutil
from stargzfs.errors import UsageError
from stargzfs.estargz.toc import parse_toc
from stargzfs.rafs.materialize import COMPRESSIONS, MaterializeResult, Progress, materialize

_BLOB_URL = re.compile(r"^(?P<scheme>https?)://(?P<host>[^/]+)/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[0-9a-fA-F]+)$")
DEFAULT_REGISTRY_TIMEOUT = 15.0  # = RegistryConfig.timeout; not imported so `--help` stays cheap
DEFAULT_REGISTRY_RETRIES = 3  # = RegistryConfig.retries
_REF_AT_DIGEST = re.compile(r"^(?P<ref>[^@]+)@(?P<digest>[a-z0-9]+:[0-9a-fA-F]+)$")


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "materialize",
        help="write the uncompressed blob cache (erofs device file) of a layer blob",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--blob-meta", required=True, type=Path, metavar="META", help="blob.meta written by create")
    parser.add_argument(
        "--blob",
        required=True,
        metavar="FILE|URL",
        help="layer blob: a local file, http(s)://HOST/v2/REPO/blobs/DIGEST, or REF@DIGEST",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DEV", help="cache file to write")
    parser.add_argument("--toc", type=Path, metavar="TOC", help="TOC JSON: verify chunks against its digests")
    parser.add_argument(
        "--mode", type=_file_mode, default=0o600, metavar="OCTAL",
        help="permissions of DEV (default 0600: it holds the layer's data uncompressed)",
    )
    parser.add_argument(
        "--compressor", choices=COMPRESSIONS, help="blob compression (default: detected from the data)"
    )
    cliutil.add_registry_options(parser, timeout=DEFAULT_REGISTRY_TIMEOUT, retries=DEFAULT_REGISTRY_RETRIES)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar (there is none unless stderr is a terminal)")
    parser.set_defaults(func=run)


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0640") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode (0 to 0777)")
    return mode


def _read_input(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def _remote_source(blob: str) -> tuple[str, str, bool] | None:
    """(reference, digest, plain_http) for URL/REF@DIGEST sources, None for local files."""
    if blob.startswith(("http://", "https://")) and "@" in blob.split("/")[2]:
        # never echo it: the user info part is a secret
        raise UsageError("--blob URL must not carry credentials; use ~/.docker/config.json instead")
    match = _BLOB_URL.match(blob)
    if match:
        return f"{match['host']}/{match['repo']}", match["digest"], match["scheme"] == "http"
    if blob.startswith(("http://", "https://")):
        raise UsageError(f"--blob URL must look like https://HOST/v2/REPO/blobs/sha256:HEX, got {blob!r}")
    match = _REF_AT_DIGEST.match(blob)
    if match and not Path(blob).exists():
        return match["ref"], match["digest"], False
    return None


async def _materialize_remote(
    blob_meta: bytes, ref: str, digest: str, output: Path, *, config: Any, **options: Any
) -> MaterializeResult:
    from stargzfs.registry.client import RegistryClient

    async with RegistryClient(config) as client:
        return await materialize(blob_meta, client.blob(ref, digest), output, **options)


async def _materialize_file(blob_meta: bytes, path: Path, output: Path, **options: Any) -> MaterializeResult:
    from stargzfs.estargz.fetch import FileRangeReader

    if not path.is_file():
        raise UsageError(f"--blob {path} is not a readable file (nor a URL or REF@DIGEST)")
    return await materialize(blob_meta, FileRangeReader(path), output, blob_size=path.stat().st_size, **options)


def run(args: argparse.Namespace) -> int:
    blob_meta = _read_input(args.blob_meta, "--blob-meta")
    toc = parse_toc(_read_input(args.toc, "--toc")) if args.toc else None
    output: Path = args.output  # a missing or read-only directory is an OutputError (exit 1) when written
    remote = _remote_source(args.blob)
    bar = cliutil.ProgressBar.for_stderr(quiet=args.quiet)
    progress: Progress | None = bar.update if bar is not None else None
    options = {"toc": toc, "compression": args.compressor, "mode": args.mode, "progress": progress}
    job: Callable[[], Any]
    if remote is not None:
        ref, digest, plain_http = remote
        config = cliutil.registry_config(args, [ref.split("/", 1)[0]] if plain_http else [])

        async def job() -> MaterializeResult:
            return await _materialize_remote(
                blob_meta, ref, digest, output, config=config, **options
            )

    else:

        async def job() -> MaterializeResult:
            return await _materialize_file(blob_meta, Path(args.blob), output, **options)

    try:
        result: MaterializeResult = trio.run(job)
    finally:
        if bar is not None:
            bar.finish()
    print(
        f"{result.output}: {result.size} bytes, {result.chunks} chunks ({result.verified} verified), "
        f"{result.compression}, {result.requests} range reads, {result.bytes_fetched} bytes fetched"
    )
    return 0

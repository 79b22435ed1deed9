"""`stargzfs toc REF [DIGEST]`: is this layer (or every layer of this image) eStargz, and what is its TOC?

Exit 0 with the TOC (or a summary), 3 when the layer is a plain one, other codes from
stargzfs.errors. The same two-request detection path the filesystem uses, so this is
also the tool to debug a layer the snapshotter refused. Without DIGEST the image's manifest
names the layers (and their `containerd.io/snapshot/stargz/toc.digest` annotations, checked
as the snapshotter's label would be): one summary line each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from stargzfs import cliutil
from stargzfs.atomicio import write_atomically
from stargzfs.errors import NotEstargzError, RegistryError, StargzfsError, UsageError
from stargzfs.estargz.fetch import DEFAULT_MAX_TOC_SIZE, DEFAULT_TAIL_SIZE, TocResult, fetch_toc
from stargzfs.registry import RegistryClient, RegistryConfig


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
    parser.add_argument("digest", metavar="DIGEST", nargs="?",
                        help="layer blob digest, sha256:<hex> (default: every layer of REF's manifest)")
    parser.add_argument(
        "-o", "--output", metavar="FILE",
        help="write the TOC JSON verbatim to FILE ('-' for stdout) instead of printing a summary",
    )
    parser.add_argument(
        "--toc-digest", metavar="D",
        help="expected sha256 of the TOC JSON (the containerd.io/snapshot/stargz/toc.digest label)",
    )
    parser.add_argument(
        "--tail-size", metavar="N", type=_positive_int, default=DEFAULT_TAIL_SIZE,
        help=f"bytes read from the blob's end in the first request (default {DEFAULT_TAIL_SIZE})",
    )
    parser.add_argument(
        "--max-toc-size", metavar="N", type=_positive_int, default=DEFAULT_MAX_TOC_SIZE,
        help=f"refuse TOCs larger than N bytes, compressed or not (default {DEFAULT_MAX_TOC_SIZE})",
    )
    cliutil.add_registry_options(
        parser, timeout=RegistryConfig.timeout, retries=RegistryConfig.retries, timeout_aliases=("--timeout",)
    )
    parser.set_defaults(func=run)


TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"


def run(args: argparse.Namespace) -> int:
    if args.digest is None:
        if args.output is not None:
            raise UsageError("-o needs a DIGEST: which layer's TOC should it write?")
        lines, code = trio.run(_every_layer, args)
        print("\n".join(lines))
        return code
    result = trio.run(_fetch, args)
    if args.output is None:
        print(summary(args.digest, result))
    elif args.output == "-":
        sys.stdout.buffer.write(result.raw)
        sys.stdout.buffer.flush()
    else:
        write_atomically(Path(args.output), result.raw)
    return 0


async def _every_layer(args: argparse.Namespace) -> tuple[list[str], int]:
    """One line per layer of the image; the exit code of the worst failure (plain layers are fine)."""
    lines, code = [], 0
    async with RegistryClient(cliutil.registry_config(args)) as client:
        manifest = await client.get_manifest(args.ref)
        for index, layer in enumerate(manifest["layers"]):
            if not isinstance(layer, dict) or not isinstance(layer.get("digest"), str):
                raise RegistryError(f"{args.ref}: manifest layer {index} has no digest")
            annotations = layer.get("annotations") if isinstance(layer.get("annotations"), dict) else {}
            try:
                result = await fetch_toc(
                    client.blob(args.ref, layer["digest"]), tail_size=args.tail_size, max_toc_size=args.max_toc_size,
                    expected_digest=annotations.get(TOC_DIGEST_ANNOTATION),
                )
            except NotEstargzError as exc:
                lines.append(f"layer {index} {layer['digest']}: {exc}")
                continue
            except StargzfsError as exc:
                lines.append(f"layer {index} {layer['digest']}: error: {exc}")
                code = max(code, exc.exit_code)
                continue
            lines.append(f"layer {index} {summary(layer['digest'], result)}")
    return lines, code


async def _fetch(args: argparse.Namespace) -> TocResult:
    async with RegistryClient(cliutil.registry_config(args)) as client:
        reader = client.blob(args.ref, args.digest)
        return await fetch_toc(
            reader,
            tail_size=args.tail_size,
            max_toc_size=args.max_toc_size,
            expected_digest=args.toc_digest,
        )


def summary(layer_digest: str, result: TocResult) -> str:
    footer = result.footer
    assert result.toc is not None  # fetched with parse=True
    requests = f"{result.requests} request" + ("s" if result.requests != 1 else "")
    return (
        f"{layer_digest}: {footer.kind} ({footer.compression}), {len(result.toc.entries)} entries, "
        f"TOC {len(result.raw)} bytes ({footer.toc_compressed_size} compressed at offset "
        f"{footer.toc_offset}), {result.toc.digest}, {requests}, {result.bytes_fetched} bytes fetched"
    )

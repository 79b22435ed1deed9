"""Every parser of untrusted bytes, its honest seed inputs, and what it may raise.

Shared by the property tests (tests/test_properties.py, Hypothesis) and the long mode
(`scripts/fuzz.py`, 100k+ mutated cases per parser with time and memory per case). The
contract checked is the same in both: any input gives a result or one of our
StargzfsErrors (one line, a documented exit code), never another exception.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from stargzfs.errors import StargzfsError
from stargzfs.estargz.codecs import CODECS
from stargzfs.estargz.fetch import read_toc_file
from stargzfs.estargz.footer import MAX_FOOTER_SIZE, parse_footer
from stargzfs.estargz.toc import parse_toc
from stargzfs.rafs.blobmeta import decode_blob_meta
from stargzfs.rafs.build import build_bootstrap
from stargzfs.rafs.check import check_bootstrap
from stargzfs.rafs.inspect import inspect_bootstrap
from stargzfs.rafs.reader import read_bootstrap
from stargzfs.snapshots.store import load_snapshots

from support.crafted import crafted_layer
from support.paths import NYDUS_FIXTURES

#: every exit code a parser may fail with (malformed, unsupported, verification, usage)
ALLOWED_EXIT_CODES = frozenset({2, 3, 5, 6, 7})


@dataclass(frozen=True)
class Parser:
    name: str
    seeds: Callable[[], list[bytes]]  # honest inputs to mutate
    run: Callable[[bytes], object]  # raises StargzfsError or returns


def _scratch() -> Path:
    """A per-process tmpfs file for parsers that read files (cheap to rewrite per case)."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    return base / f"stargzfs-fuzz-{os.getpid()}"


def _via_file(name: str, parse: Callable[[Path], object]) -> Callable[[bytes], object]:
    def run(data: bytes) -> object:
        directory = _scratch()
        directory.mkdir(exist_ok=True)
        path = directory / name
        path.write_bytes(data)
        return parse(path)

    return run


@cache
def layer_seeds() -> list[bytes]:
    files = {"etc/hostname": b"box\n", "bin/tool": bytes(range(256)) * 40, "empty": b""}
    seeds = [crafted_layer(files, codec=codec)[0] for codec in CODECS]
    seeds += [path.read_bytes() for path in sorted((NYDUS_FIXTURES / "blobs").iterdir())]
    return seeds


@cache
def toc_seeds() -> list[bytes]:
    return [(NYDUS_FIXTURES / f"stargz.index-{kind}.json").read_bytes() for kind in ("lower", "upper", "empty")]


@cache
def bootstrap_seeds() -> list[bytes]:
    return [build_bootstrap(parse_toc(raw), blob_id="ab" * 32).bootstrap for raw in toc_seeds()]


@cache
def blob_meta_seeds() -> list[bytes]:
    metas = [build_bootstrap(parse_toc(raw), blob_id="ab" * 32).blob_meta for raw in toc_seeds()]
    return [meta for meta in metas if meta is not None]


def _footer(blob: bytes) -> object:
    if not blob:
        return None
    return parse_footer(blob[-MAX_FOOTER_SIZE:], len(blob))


def _bootstrap(data: bytes) -> object:
    check_bootstrap(data)  # reports problems, never raises them
    inspect_bootstrap(data, "stats")
    return read_bootstrap(data)


@cache
def metadata_db_seeds() -> list[bytes]:
    """A small metadata.db from containerd's own storage code (the Go helper, built on demand)."""
    from support.gohelper import Snapdb, build_snapdb, image_chain_ops

    work = Path(tempfile.mkdtemp(prefix="stargzfs-fuzz-db-"))
    snapdb = Snapdb(build_snapdb(work))
    db = work / "metadata.db"
    snapdb.apply(db, [list(image_chain_ops("registry.local/app:v1", 4, label_extra={"x": "y" * 3000}))])
    return [db.read_bytes()]


PARSERS = {
    parser.name: parser
    for parser in (
        Parser("footer", layer_seeds, _footer),
        Parser("toc-fetch", layer_seeds, _via_file("blob", read_toc_file)),
        Parser("toc", toc_seeds, parse_toc),
        Parser("bootstrap", bootstrap_seeds, _bootstrap),
        Parser("blob.meta", blob_meta_seeds, decode_blob_meta),
        Parser("metadata.db", metadata_db_seeds, _via_file("metadata.db", load_snapshots)),
    )
}


def outcome(parser: Parser, data: bytes) -> str:
    """"ok", "error <exit code>", or raise AssertionError for anything the contract forbids."""
    try:
        parser.run(data)
    except StargzfsError as exc:
        message = str(exc)
        assert exc.exit_code in ALLOWED_EXIT_CODES, f"{parser.name}: exit code {exc.exit_code}: {message}"
        assert "\n" not in message and message, f"{parser.name}: not one line: {message!r}"
        return f"error {exc.exit_code}"
    return "ok"


def mutate(rng: random.Random, seed: bytes) -> bytes:
    """One mutation the way a coverage-blind fuzzer does it: flips, integer fields set to
    boundary values, truncation, splices, duplication; sometimes several at once."""
    data = bytearray(seed)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        choice = rng.randrange(7)
        if not data or choice == 0:
            data += rng.randbytes(rng.randrange(1, 64))
        elif choice == 1:  # flip bits
            for _ in range(rng.randrange(1, 9)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice == 2 and len(data) >= 8:  # an integer field set to a boundary value
            at = rng.randrange(len(data) - 7)
            width, fmt = rng.choice(((2, "<H"), (4, "<I"), (8, "<Q")))
            value = rng.choice((0, 1, 2**(8 * width) - 1, 2**(8 * width - 1), rng.randrange(2**(8 * width))))
            struct.pack_into(fmt, data, min(at, len(data) - width), value)
        elif choice == 3:  # truncate
            del data[rng.randrange(len(data) + 1):]
        elif choice == 4:  # splice a random chunk in
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randrange(1, 256))
        elif choice == 5:  # duplicate a region
            start = rng.randrange(len(data))
            piece = data[start : start + rng.randrange(1, 512)]
            at = rng.randrange(len(data) + 1)
            data[at:at] = piece
        else:  # overwrite with a byte that means something in text formats
            data[rng.randrange(len(data))] = rng.choice(b'{}[]",:0-9\\\x00\xff')
    return bytes(data)

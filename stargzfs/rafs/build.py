"""TOC → (bootstrap, blob.meta): the library entry point behind `stargzfs-image create`
and the FUSE pipeline."""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path

import msgspec

from stargzfs.digest import is_layer_hex
from stargzfs.errors import StargzfsError, UsageError
from stargzfs.estargz.codecs import CODEC_NAMES
from stargzfs.estargz.toc import Toc, parse_toc
from stargzfs.gcpause import paused_gc
from stargzfs.rafs import blobindex
from stargzfs.rafs.blobmeta import encode_blob_meta
from stargzfs.rafs.from_toc import TocTree, build_tree
from stargzfs.rafs.tree import RafsImage
from stargzfs.rafs.writer import write_bootstrap

COMPRESSORS = CODEC_NAMES
MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x1000000


class BuildResult(msgspec.Struct):
    bootstrap: bytes | bytearray | mmap.mmap  # mmap: the output file's mapping (see allocate)
    blob_meta: bytes | None  # None when the layer has no data chunk (v2.1 writes no file then)
    image: RafsImage
    chunk_count: int
    blob_index: bytes | None = None  # stargzfs.rafs.blobindex, when asked for and there is data
    blob_index_problem: str | None = None  # why none was made although asked for


def validate_chunk_size(chunk_size: int) -> None:
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"chunk size {chunk_size:#x} must be a power of two between 0x1000 and 0x1000000")


def validate_blob_id(blob_id: str) -> None:
    if not is_layer_hex(blob_id):
        raise UsageError(f"blob id {blob_id!r} must be 64 lowercase hex characters (the layer digest)")


def _validate(blob_id: str, chunk_size: int, compressor: str) -> None:
    validate_blob_id(blob_id)
    validate_chunk_size(chunk_size)
    if compressor not in COMPRESSORS:
        raise UsageError(f"compressor {compressor!r} must be one of {', '.join(COMPRESSORS)}")


def build_bootstrap(
    toc: Toc,
    *,
    blob_id: str,
    chunk_size: int = 0x400000,
    repeatable: bool = True,
    compressor: str = "gzip",
) -> BuildResult:
    """UsageError for bad parameters, UnsupportedError/FormatError for TOCs we cannot serve."""
    _validate(blob_id, chunk_size, compressor)
    with paused_gc():
        tree = build_tree(toc, blob_id=blob_id, chunk_size=chunk_size, repeatable=repeatable, compressor=compressor)
        return _finish(tree)


def build_bootstrap_from_toc_file(
    path: Path,
    *,
    blob_id: str,
    chunk_size: int = 0x400000,
    repeatable: bool = True,
    compressor: str = "gzip",
    blob_index: bool = False,
    allocate: Callable[[int], bytearray | mmap.mmap] | None = None,
) -> BuildResult:
    """`build_bootstrap(parse_toc(path.read_bytes()))`, except that the TOC bytes and model
    are freed before the bootstrap is serialised, which sets `stargzfs-image create`'s peak
    RSS (a caller holding the Toc would keep ~2/3 of that peak alive).

    `allocate` is handed to write_bootstrap (e.g. a mapping of the output file, which keeps
    a 1M-entry image's 190 MB out of the peak). `blob_index=True` also makes the
    lazy-serving index of the blob.meta (blobindex.build) from the same parse: the digests
    it needs are decoded too, and taken out before the tree consumes the entries.

    UsageError when the file cannot be read; otherwise as build_bootstrap.
    """
    _validate(blob_id, chunk_size, compressor)
    toc = _parse_toc_file(path, digests=blob_index)  # the bootstrap needs no digest strings
    with paused_gc():
        chunks, index_problem = _index_chunks(toc) if blob_index else (None, None)
        tree = build_tree(
            toc, blob_id=blob_id, chunk_size=chunk_size, repeatable=repeatable, compressor=compressor,
            consume_toc=True,
        )
        del toc
        result = _finish(tree, allocate)
        if chunks is not None and result.blob_meta is not None:
            try:
                result.blob_index = blobindex.match(chunks, result.blob_meta, tree.index_records).encode()
            except StargzfsError as exc:
                index_problem = str(exc)
        result.blob_index_problem = index_problem
        return result


def _parse_toc_file(path: Path, *, digests: bool) -> Toc:
    """Decoded straight from a read-only mapping of the file: reading it into a bytes
    object first cost ~20 ms per 100k entries (a 30 MB copy into freshly faulted memory),
    and msgspec decodes the mapping as fast. The Toc keeps no raw bytes (this Toc is the
    builder's alone; only `stargz.index.json` writers need them)."""
    try:
        with open(path, "rb") as file:
            try:
                mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            except (ValueError, OSError):  # empty, or not a mappable file (a pipe): read it
                return parse_toc(file.read(), digests=digests, keep_raw=False)
    except OSError as exc:
        raise UsageError(f"cannot read TOC {str(path)!r}: {exc.strerror}") from None
    with mapping:
        return parse_toc(mapping, digests=digests, keep_raw=False)


def _index_chunks(toc: Toc) -> tuple[blobindex.TocChunks | None, str | None]:
    """What the index needs, or why there is none: a TOC the bootstrap can be built from
    but lazy serving cannot use (say, a digest that is not sha256) still gets its bootstrap,
    as it did before the index was made here."""
    try:
        return blobindex.toc_chunks(toc), None
    except StargzfsError as exc:
        return None, str(exc)


def _finish(tree: TocTree, allocate: Callable[[int], bytearray | mmap.mmap] | None = None) -> BuildResult:
    bootstrap = write_bootstrap(tree.image, allocate=allocate)
    blob_meta = encode_blob_meta(tree.index_records) if tree.index_records else None
    return BuildResult(bootstrap, blob_meta, tree.image, len(tree.index_records))

"""TOC → (bootstrap, blob.meta): the library entry point behind `stargzfs-image create`
and the FUSE pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from stargzfs.errors import UsageError
from stargzfs.estargz.toc import Toc
from stargzfs.gcpause import paused_gc
from stargzfs.rafs.blobmeta import ChunkMeta, encode_blob_meta
from stargzfs.rafs.from_toc import build_tree
from stargzfs.rafs.tree import RafsImage
from stargzfs.rafs.writer import write_bootstrap

COMPRESSORS = ("gzip", "zstd")
MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x1000000


@dataclass
class BuildResult:
    bootstrap: bytes
    blob_meta: bytes | None  # None when the layer has no data chunk (v2.1 writes no file then)
    image: RafsImage
    chunk_count: int


def validate_chunk_size(chunk_size: int) -> None:
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise UsageError(f"chunk size {chunk_size:#x} must be a power of two between 0x1000 and 0x1000000")


def validate_blob_id(blob_id: str) -> None:
    if len(blob_id) != 64 or any(ch not in "0123456789abcdef" for ch in blob_id):
        raise UsageError(f"blob id {blob_id!r} must be 64 lowercase hex characters (the layer digest)")


def build_bootstrap(
    toc: Toc,
    *,
    blob_id: str,
    chunk_size: int = 0x400000,
    repeatable: bool = True,
    compressor: str = "gzip",
) -> BuildResult:
    """UsageError for bad parameters, UnsupportedError/FormatError for TOCs we cannot serve."""
    validate_blob_id(blob_id)
    validate_chunk_size(chunk_size)
    if compressor not in COMPRESSORS:
        raise UsageError(f"compressor {compressor!r} must be one of {', '.join(COMPRESSORS)}")
    with paused_gc():
        tree = build_tree(toc, blob_id=blob_id, chunk_size=chunk_size, repeatable=repeatable, compressor=compressor)
        bootstrap = write_bootstrap(tree.image)
    blob_meta = None
    if tree.index_records:
        blob_meta = encode_blob_meta(
            [
                ChunkMeta(ref.uncompressed_offset, ref.uncompressed_size, ref.compressed_offset, ref.compressed_size)
                for ref in tree.index_records
            ]
        )
    return BuildResult(bootstrap, blob_meta, tree.image, len(tree.index_records))

"""The nydus-image v2.1 `*.blob.meta` file (rafs-v6 spec §3.1).

nydusd maps every RAFS v6 chunk index to an entry of this file to find where the chunk's
gzip member starts in the layer blob and where its bytes live in the uncompressed blob
cache. stargzfs writes it byte-compatible with v2.1 so that nydusd can serve our bootstraps.

Layout: `[16-byte chunk info × n][zeros to 4 KiB][4096-byte header]`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

import msgspec

from stargzfs.errors import FormatError

BLOB_META_MAGIC = 0xB10BB10B
FEATURE_4K_ALIGNED = 0x1
COMPRESSOR_NONE = 0
HEADER_SIZE = 4096
CHUNK_INFO_SIZE = 16
PAGE_SIZE = 4096
MAX_ENTRIES = 0xFFFFF  # v2.1 limit on chunk-info entries
MAX_CHUNK_SIZE = 1 << 24  # sizes are stored as 24-bit (size - 1)
MAX_COMPRESSED_OFFSET = (1 << 40) - 1
MAX_UNCOMPRESSED_OFFSET = (1 << 44) - 1

_HEADER_HEAD = struct.Struct("<IIIIQQQ")  # magic, features, compressor, entries, ci_offset, csize, usize
_MAGIC2_OFFSET = HEADER_SIZE - 4
_CHUNK_INFO = struct.Struct("<QQ")
_UOFF_MASK = 0xFFF_FFFF_F000
_COFF_MASK = 0xFF_FFFF_FFFF
# v2.1 never computes compressed sizes for stargz; release builds store (0 - 1) wrapped,
# i.e. all ones in bits 40..63 of the comp_info word.
_UNKNOWN_CSIZE_BITS = 0xFFFFFF << 40


class ChunkMeta(msgspec.Struct, frozen=True):
    """One chunk as nydusd sees it: where it is in the layer blob and in the blob cache."""

    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    compressed_size: int


class ChunkLocation(Protocol):
    """What the encoder reads from a chunk: ChunkMeta, or the builder's tree.ChunkRef."""

    @property
    def uncompressed_offset(self) -> int: ...
    @property
    def uncompressed_size(self) -> int: ...
    @property
    def compressed_offset(self) -> int: ...
    @property
    def compressed_size(self) -> int: ...


class BlobMetaHeader(msgspec.Struct, frozen=True):
    """The 4096-byte trailer; nydusd requires it to equal the blob-table entry's CI fields."""

    magic: int
    features: int
    ci_compressor: int
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int


def blob_meta_header_for(chunk_count: int) -> BlobMetaHeader:
    """The header v2.1 writes for `chunk_count` entries (also copied into the blob table)."""
    if not 0 <= chunk_count <= MAX_ENTRIES:
        raise FormatError(f"blob.meta: {chunk_count} chunks exceed the v2.1 limit of {MAX_ENTRIES}")
    array_size = CHUNK_INFO_SIZE * chunk_count
    return BlobMetaHeader(
        magic=BLOB_META_MAGIC,
        features=FEATURE_4K_ALIGNED,
        ci_compressor=COMPRESSOR_NONE,
        ci_entries=chunk_count,
        ci_offset=0,
        ci_compressed_size=array_size,
        ci_uncompressed_size=array_size,
    )


def _round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _encode_chunk(index: int, chunk: ChunkLocation) -> bytes:
    uoff, usize = chunk.uncompressed_offset, chunk.uncompressed_size
    coff, csize = chunk.compressed_offset, chunk.compressed_size
    if uoff % PAGE_SIZE or not 0 <= uoff <= MAX_UNCOMPRESSED_OFFSET:
        raise FormatError(f"blob.meta chunk {index}: uncompressed offset {uoff} is not a 4 KiB aligned 44-bit value")
    if not 1 <= usize <= MAX_CHUNK_SIZE:
        raise FormatError(f"blob.meta chunk {index}: uncompressed size {usize} is outside 1..{MAX_CHUNK_SIZE}")
    if not 0 <= coff <= MAX_COMPRESSED_OFFSET:
        raise FormatError(f"blob.meta chunk {index}: compressed offset {coff} does not fit in 40 bits")
    if not 0 <= csize <= MAX_CHUNK_SIZE:
        raise FormatError(f"blob.meta chunk {index}: compressed size {csize} is outside 0..{MAX_CHUNK_SIZE}")
    size_minus_one = usize - 1
    uncomp_info = uoff | ((size_minus_one & 0xFFFFF) << 44) | (((size_minus_one >> 20) & 0xF) << 8)
    if csize == 0:
        comp_info = coff | _UNKNOWN_CSIZE_BITS
    else:
        csize_minus_one = csize - 1
        comp_info = coff | ((csize_minus_one & 0xFFFFF) << 44) | (((csize_minus_one >> 20) & 0xF) << 40)
    return _CHUNK_INFO.pack(uncomp_info, comp_info)


def _encode_header(header: BlobMetaHeader) -> bytes:
    head = _HEADER_HEAD.pack(
        header.magic,
        header.features,
        header.ci_compressor,
        header.ci_entries,
        header.ci_offset,
        header.ci_compressed_size,
        header.ci_uncompressed_size,
    )
    return head + bytes(_MAGIC2_OFFSET - len(head)) + struct.pack("<I", header.magic)


def encode_blob_meta(chunks: Sequence[ChunkLocation]) -> bytes:
    """Chunks must already be in chunk-index order (= uncompressed-offset order).

    A compressed size of 0 (always the case for v2.1 stargz) is stored as v2.1 release
    builds do: bits 40-63 all ones. Any object with ChunkMeta's four attributes will do
    (the builder passes its chunk refs directly: no per-chunk copies on 1M-chunk layers).
    """
    header = blob_meta_header_for(len(chunks))
    array_size = CHUNK_INFO_SIZE * len(chunks)
    out = bytearray(_round_up(array_size, PAGE_SIZE))
    pack_into = _CHUNK_INFO.pack_into
    position = 0
    for index, chunk in enumerate(chunks):
        uoff, usize = chunk.uncompressed_offset, chunk.uncompressed_size
        coff, csize = chunk.compressed_offset, chunk.compressed_size
        if (
            uoff & (PAGE_SIZE - 1) or not 0 <= uoff <= MAX_UNCOMPRESSED_OFFSET or not 1 <= usize <= MAX_CHUNK_SIZE
            or not 0 <= coff <= MAX_COMPRESSED_OFFSET or csize
        ):
            # unusual (a known compressed size) or invalid: the checked per-chunk encoder
            out[position:position + CHUNK_INFO_SIZE] = _encode_chunk(index, chunk)
        else:
            size_minus_one = usize - 1
            pack_into(
                out, position,
                uoff | ((size_minus_one & 0xFFFFF) << 44) | (((size_minus_one >> 20) & 0xF) << 8),
                coff | _UNKNOWN_CSIZE_BITS,
            )
        position += CHUNK_INFO_SIZE
    out += _encode_header(header)
    return bytes(out)


def _decode_chunk(word0: int, word1: int) -> ChunkMeta:
    usize = ((word0 >> 44) | ((word0 & 0xF00) << 12)) + 1
    csize = ((word1 >> 44) | (((word1 >> 40) & 0xF) << 20)) + 1
    return ChunkMeta(
        uncompressed_offset=word0 & _UOFF_MASK,
        uncompressed_size=usize,
        compressed_offset=word1 & _COFF_MASK,
        compressed_size=csize,
    )


def _header(data: bytes) -> BlobMetaHeader:
    """The checked trailer; the size checks catch truncated or foreign files."""
    if len(data) < HEADER_SIZE or len(data) % PAGE_SIZE:
        raise FormatError(f"blob.meta: size {len(data)} is not a non-zero multiple of {PAGE_SIZE} bytes")
    raw_header = data[-HEADER_SIZE:]
    magic, features, compressor, entries, ci_offset, ci_csize, ci_usize = _HEADER_HEAD.unpack_from(raw_header)
    (magic2,) = struct.unpack_from("<I", raw_header, _MAGIC2_OFFSET)
    if magic != BLOB_META_MAGIC or magic2 != BLOB_META_MAGIC:
        raise FormatError(f"blob.meta: bad magic {magic:#010x}/{magic2:#010x} (expected {BLOB_META_MAGIC:#010x})")
    header = BlobMetaHeader(magic, features, compressor, entries, ci_offset, ci_csize, ci_usize)
    if compressor != COMPRESSOR_NONE:
        raise FormatError(f"blob.meta: compressed chunk-info array (compressor {compressor}) is not supported")
    array_size = CHUNK_INFO_SIZE * entries
    if ci_usize != array_size or ci_csize != array_size:
        raise FormatError(f"blob.meta: header sizes {ci_csize}/{ci_usize} do not match {entries} entries")
    expected_size = ci_offset + _round_up(array_size, PAGE_SIZE) + HEADER_SIZE
    if ci_offset != 0 or len(data) != expected_size:
        raise FormatError(
            f"blob.meta: {entries} entries at offset {ci_offset} need a {expected_size}-byte file, got {len(data)}"
        )
    return header


def decode_blob_meta(data: bytes) -> tuple[BlobMetaHeader, list[ChunkMeta]]:
    """Parse a v2.1 blob.meta.

    Compressed sizes come back as stored: 16 MiB (all ones) for v2.1 stargz files, so
    callers must not trust them.
    """
    header = _header(data)
    chunks = [_decode_chunk(w0, w1) for w0, w1 in _CHUNK_INFO.iter_unpack(data[: CHUNK_INFO_SIZE * header.ci_entries])]
    return header, chunks


def uncompressed_extent(data: bytes) -> tuple[int, int]:
    """(entries, end of the last chunk) without decoding every entry: entries are in chunk
    index order, which is uncompressed-offset order, so the last one ends the blob."""
    header = _header(data)
    if not header.ci_entries:
        return 0, 0
    last = _decode_chunk(*_CHUNK_INFO.unpack_from(data, CHUNK_INFO_SIZE * (header.ci_entries - 1)))
    return header.ci_entries, last.uncompressed_offset + last.uncompressed_size

"""What lazy serving needs from a layer's TOC, parsed once into a small file of our own.

For every blob.meta entry: the sha256 its uncompressed bytes must have (the TOC's
`chunkDigest`, or the file digest of a file that is one chunk), and whether it belongs to a
file before `.prefetch.landmark` (estargz.md §A5). The TOC is untrusted input, so it is
parsed in a capped builder process: by `stargzfs-image create --blob-index` during the
layer's conversion (same parse as the bootstrap), else by `stargzfs-image blob-index` when
the blob is first opened. The mount then reads only this fixed-layout file, which also
names the blob.meta it was made for.

`[header 64 B][32-byte digest × n (zeros: none known)][prefetch bitmap, ceil(n / 8) B]`
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
import msgspec

from stargzfs.errors import FormatError, UnsupportedError
from stargzfs.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, Chunk, Toc
from stargzfs.rafs.blobmeta import ChunkLocation, decode_blob_meta

MAGIC = b"SGZIDX01"
_HEADER = struct.Struct("<8sII32s16x")  # magic, chunk count, flags, sha256 of the blob.meta
FLAG_PREFETCH_LANDMARK = 0x1
FLAG_NO_PREFETCH_LANDMARK = 0x2
DIGEST_SIZE = 32
_NO_DIGEST = bytes(DIGEST_SIZE)


class BlobIndex(msgspec.Struct, frozen=True):
    blob_meta_sha256: bytes
    digests: list[bytes | None]  # per blob.meta entry
    prefetch: bytes  # bitmap over blob.meta entries, MSB first
    flags: int

    @property
    def chunk_count(self) -> int:
        return len(self.digests)

    def in_prefetch(self, index: int) -> bool:
        return bool(self.prefetch[index >> 3] & (1 << (7 - (index & 7))))

    def encode(self) -> bytes:
        header = _HEADER.pack(MAGIC, self.chunk_count, self.flags, self.blob_meta_sha256)
        return header + b"".join(d or _NO_DIGEST for d in self.digests) + bytes(self.prefetch)


def decode(data: bytes, blob_meta: bytes) -> BlobIndex:
    """Our own file, still checked: it must be whole and made for exactly this blob.meta."""
    if len(data) < _HEADER.size:
        raise FormatError(f"blob index is {len(data)} bytes, shorter than its header")
    magic, count, flags, meta_sha = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError(f"blob index has magic {magic!r}, not {MAGIC!r}")
    expected = _HEADER.size + count * DIGEST_SIZE + (count + 7) // 8
    if len(data) != expected:
        raise FormatError(f"blob index of {count} chunks is {len(data)} bytes, not {expected}")
    if meta_sha != hashlib.sha256(blob_meta).digest():
        raise FormatError("blob index was made for another blob.meta")
    digests_end = _HEADER.size + count * DIGEST_SIZE
    digests = [
        None if piece == _NO_DIGEST else piece
        for piece in (data[offset : offset + DIGEST_SIZE] for offset in range(_HEADER.size, digests_end, DIGEST_SIZE))
    ]
    return BlobIndex(meta_sha, digests, data[digests_end:], flags)


class TocChunks(msgspec.Struct, frozen=True):
    """What an index needs from a TOC, taken before the TOC model is consumed (a builder
    frees entries while it makes nodes): each compressed member's first chunk with its raw
    sha256, which members start before `.prefetch.landmark`, and the landmark flags."""

    by_offset: dict[int, tuple[Chunk, bytes | None]]
    prefetch_offsets: set[int]
    flags: int


def toc_chunks(toc: Toc) -> TocChunks:
    """A FormatError for a digest that is not sha256:<64 hex>."""
    by_offset: dict[int, tuple[Chunk, bytes | None]] = {}
    prefetch_offsets: set[int] = set()
    flags = 0
    before_landmark = True
    for entry in toc.entries:
        if entry.name == PREFETCH_LANDMARK:
            flags |= FLAG_PREFETCH_LANDMARK
            before_landmark = False
        elif entry.name == NO_PREFETCH_LANDMARK:
            flags |= FLAG_NO_PREFETCH_LANDMARK
        for chunk in entry.chunks:
            digest = chunk.digest
            if digest is None and len(entry.chunks) == 1 and chunk.size == entry.size:
                digest = entry.digest  # type: ignore[attr-defined]  # old stargz: the file is one chunk
            by_offset.setdefault(chunk.offset, (chunk, _raw_sha256(digest, chunk.offset)))
            if before_landmark:
                prefetch_offsets.add(chunk.offset)
    if not flags & FLAG_PREFETCH_LANDMARK:
        prefetch_offsets.clear()  # without the landmark nothing is prioritised
    return TocChunks(by_offset, prefetch_offsets, flags)


def build(toc: Toc, blob_meta: bytes) -> BlobIndex:
    """Match TOC chunks to blob.meta entries by compressed offset (both name the member).

    A blob.meta entry no TOC chunk starts at, or one of another size, is a FormatError; an
    innerOffset chunk (several files in one member) an UnsupportedError: blob.meta cannot
    describe it.
    """
    return match(toc_chunks(toc), blob_meta)


def match(facts: TocChunks, blob_meta: bytes, chunks: Sequence[ChunkLocation] | None = None) -> BlobIndex:
    """The index of `blob_meta` from its TOC's chunks (see build). `chunks`: blob.meta's
    entries when the caller has them already (the builder that just encoded them)."""
    if chunks is None:
        _, chunks = decode_blob_meta(blob_meta)
    by_offset, prefetch_offsets = facts.by_offset, facts.prefetch_offsets
    digests: list[bytes | None] = []
    prefetch = bytearray((len(chunks) + 7) // 8)
    for index, chunk in enumerate(chunks):
        coff = chunk.compressed_offset
        found = by_offset.get(coff)
        if found is None:
            raise FormatError(f"blob.meta entry {index}: no TOC chunk starts at compressed offset {coff}")
        toc_chunk, digest = found
        if toc_chunk.inner_offset:
            raise UnsupportedError(
                f"TOC chunk at compressed offset {coff} has innerOffset {toc_chunk.inner_offset}; "
                "blob.meta cannot describe it"
            )
        if toc_chunk.size != chunk.uncompressed_size:
            raise FormatError(
                f"blob.meta entry {index}: {chunk.uncompressed_size} bytes at compressed offset {coff}, "
                f"the TOC says {toc_chunk.size}"
            )
        digests.append(digest)
        if coff in prefetch_offsets:
            prefetch[index >> 3] |= 1 << (7 - (index & 7))
    return BlobIndex(hashlib.sha256(blob_meta).digest(), digests, bytes(prefetch), facts.flags)


def _raw_sha256(digest: str | None, offset: int) -> bytes | None:
    if digest is None:
        return None
    algorithm, _, encoded = digest.partition(":")
    if algorithm == "sha256" and len(encoded) == 64:
        try:
            return bytes.fromhex(encoded)
        except ValueError:
            pass
    raise FormatError(f"TOC digest {digest[:100]!r} for compressed offset {offset} is not sha256:<64 hex>")

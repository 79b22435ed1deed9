"""Where each chunk of a layer lives, compressed in the blob and uncompressed in the cache.

The plan both `materialize` (every chunk, in one pass) and the mount's lazy blob server (the
chunks a read needs) follow: distinct chunks from the blob.meta, the compressed bytes each
needs (v2.1 blob.meta files carry no usable compressed sizes, so a chunk ends where the next
member starts, or within a worst-case expansion bound), ranges coalesced so a registry sees
few large requests, and every chunk decoded and checked against its digest before use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
import msgspec

from stargzfs.errors import FormatError, UnsupportedError, VerificationError
from stargzfs.estargz.codec import Codec
from stargzfs.estargz.decompress import inflate_prefix
from stargzfs.rafs.blobmeta import ChunkMeta

PAGE_SIZE = 4096
MAX_SPAN = 32 << 20  # bytes fetched per range request at most (unless one chunk needs more)
MAX_GAP = 1 << 20  # unused bytes we accept reading to save a request


class PlannedChunk(msgspec.Struct, frozen=True):
    """One distinct chunk (hardlinked files share one) and every blob.meta entry naming it."""

    indexes: tuple[int, ...]  # blob.meta entries (= nydusd chunk indexes); the first names it in errors
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    read_end: int  # exclusive end of the compressed bytes that surely hold it
    digest: bytes | None  # sha256 its bytes must have, when the TOC says

    @property
    def index(self) -> int:
        return self.indexes[0]


def worst_compressed_size(size: int) -> int:
    """Upper bound on the compressed bytes needed to inflate `size` bytes.

    Covers deflate stored blocks and zstd raw blocks (≤128 KiB each) with room to spare.
    """
    return size + size // 128 + (256 << 10)


def cache_size(chunks: Sequence[ChunkMeta]) -> int:
    """Bytes of the uncompressed cache file: the end of the last chunk, 4 KiB aligned."""
    end = max((c.uncompressed_offset + c.uncompressed_size for c in chunks), default=0)
    return (end + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def plan(
    chunks: Sequence[ChunkMeta], *, digests: Sequence[bytes | None] | None = None, blob_end: int | None = None
) -> list[PlannedChunk]:
    """Distinct chunks sorted by compressed offset, overlaps and shared members refused.

    `blob_end` bounds the last chunk when known (the blob size); without it the expansion
    bound does, and the reader clamps to the size the first answer reveals.
    """
    by_uoff: dict[int, list[int]] = {}
    by_coff: dict[int, int] = {}
    for index, chunk in enumerate(chunks):
        same = by_uoff.get(chunk.uncompressed_offset)
        if same is not None:
            first = chunks[same[0]]
            if (first.uncompressed_size, first.compressed_offset) != (chunk.uncompressed_size, chunk.compressed_offset):
                raise FormatError(
                    f"blob.meta entries {same[0]} and {index} share uncompressed offset "
                    f"{chunk.uncompressed_offset} but describe different chunks"
                )
            same.append(index)
            continue
        if chunk.compressed_offset in by_coff:
            raise UnsupportedError(
                f"blob.meta entry {index}: compressed offset {chunk.compressed_offset} is shared with another "
                "chunk (an innerOffset layout that blob.meta cannot describe)"
            )
        if blob_end is not None and chunk.compressed_offset >= blob_end:
            raise FormatError(
                f"blob.meta entry {index}: compressed offset {chunk.compressed_offset} lies beyond the end of "
                f"the {blob_end}-byte blob"
            )
        by_uoff[chunk.uncompressed_offset] = [index]
        by_coff[chunk.compressed_offset] = index
    ordered = sorted(by_uoff.values(), key=lambda same: chunks[same[0]].uncompressed_offset)
    for previous, following in zip(ordered, ordered[1:]):
        before, after = chunks[previous[0]], chunks[following[0]]
        if before.uncompressed_offset + before.uncompressed_size > after.uncompressed_offset:
            raise FormatError(f"blob.meta entry {following[0]} overlaps the chunk before it in the uncompressed blob")
    offsets = sorted(by_coff)
    next_offset = dict(zip(offsets, offsets[1:]))
    planned = []
    for same in ordered:
        chunk = chunks[same[0]]
        coff, usize = chunk.compressed_offset, chunk.uncompressed_size
        bounds = [coff + worst_compressed_size(usize)]
        bounds += [bound for bound in (next_offset.get(coff), blob_end) if bound is not None]
        digest = digests[same[0]] if digests is not None else None
        planned.append(PlannedChunk(tuple(same), chunk.uncompressed_offset, usize, coff, min(bounds), digest))
    planned.sort(key=lambda planned_chunk: planned_chunk.compressed_offset)
    return planned


def spans(
    chunks: Iterable[PlannedChunk], *, max_gap: int = MAX_GAP, max_span: int = MAX_SPAN
) -> Iterable[tuple[int, int, list[PlannedChunk]]]:
    """Group chunks (sorted by compressed offset) into (start, end, chunks) range reads."""
    group: list[PlannedChunk] = []
    start = end = 0
    for chunk in chunks:
        if group and (chunk.compressed_offset - end > max_gap or max(end, chunk.read_end) - start > max_span):
            yield start, end, group
            group = []
        if not group:
            start, end = chunk.compressed_offset, chunk.read_end
        end = max(end, chunk.read_end)
        group.append(chunk)
    if group:
        yield start, end, group


def load(chunk: PlannedChunk, data: memoryview, codec: Codec) -> bytes:
    """The chunk's uncompressed bytes from compressed bytes starting at its member, checked.

    FormatError when they do not decode to its size; VerificationError when they are not
    what the TOC says (nothing unverified is ever returned when a digest is known).
    """
    coff, usize = chunk.compressed_offset, chunk.uncompressed_size
    try:
        content = inflate_prefix(data, usize, codec)
    except FormatError as exc:
        raise FormatError(
            f"blob.meta entry {chunk.index} ({usize} bytes at compressed offset {coff}, "
            f"{len(data)} compressed bytes available): {exc}"
        ) from None
    if chunk.digest is not None:
        actual = hashlib.sha256(content).digest()
        if actual != chunk.digest:
            raise VerificationError(
                f"chunk at compressed offset {coff} has sha256:{actual.hex()}, the TOC says sha256:{chunk.digest.hex()}"
            )
    return content

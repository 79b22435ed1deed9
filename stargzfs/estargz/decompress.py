"""Chunk decoding: the uncompressed bytes of one TOC chunk from its compressed range.

Every reader of layer data (TOC chunks here, blob.meta chunks in rafs.materialize) goes
through `inflate_prefix`, with the codec's size-capped stream underneath (estargz.codec).
"""

from __future__ import annotations

from stargzfs.errors import FormatError
from stargzfs.estargz.codec import Codec
from stargzfs.estargz.toc import Chunk


def inflate_prefix(
    data: bytes | memoryview, size: int, codec: Codec, *, skip: int = 0, multi_member: bool = False
) -> bytes:
    """Exactly `size` uncompressed bytes, after skipping `skip`, of the stream at the start of `data`.

    Output past `skip + size` is expected (legacy stargz members also hold tar padding and
    the next entries' headers) and simply not produced; fewer bytes is a FormatError.
    `multi_member` continues into following gzip members / zstd frames, as upstream does
    for ranges that cross parallel-build part boundaries.
    """
    stream = codec.open_stream(data, limit=None, multi_member=multi_member)
    skipped = 0
    while skipped < skip:
        piece = stream.read(min(skip - skipped, 1 << 20))
        if not piece:
            break
        skipped += len(piece)
    out = stream.read(size) if skipped == skip else b""
    if len(out) < size:
        raise FormatError(f"{codec.name} data decodes to {skipped + len(out)} bytes, needs {skip + size}")
    return out


def read_chunk(blob: bytes | memoryview, chunk: Chunk, next_offset: int, codec: Codec) -> bytes:
    """Uncompressed bytes of one TOC chunk from a whole blob in memory (innerOffset honoured)."""
    view = memoryview(blob).cast("B")
    if not 0 <= chunk.offset < next_offset <= len(view):
        raise FormatError(f"chunk range [{chunk.offset}, {next_offset}) is outside the {len(view)}-byte blob")
    try:
        return inflate_prefix(
            view[chunk.offset : next_offset], chunk.size, codec, skip=chunk.inner_offset, multi_member=True
        )
    except FormatError as exc:
        raise FormatError(
            f"chunk at offset {chunk.offset}: {exc} (innerOffset {chunk.inner_offset} + size {chunk.size})"
        ) from None

"""Write the uncompressed blob cache nydusd's blobcache would hold for one layer.

Each blob.meta entry names a gzip member / zstd frame at a compressed offset of the layer
blob; its first `uncompressed_size` bytes land at `uncompressed_offset` of a sparse file.
That file is what the kernel's erofs driver reads through `device=` (rafs-v6 spec §9), so a
bootstrap can be mounted without nydusd. The plan (which bytes to fetch, how to decode and
check them) is rafs.chunks', shared with the mount's lazy blob server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from stargzfs.atomicio import atomic_output
from stargzfs.errors import FormatError, UnsupportedError
from stargzfs.estargz.codec import Codec
from stargzfs.estargz.codecs import CODEC_NAMES, codec_for_data, codec_named
from stargzfs.estargz.fetch import RangeReader  # registry BlobReader, FileRangeReader
from stargzfs.estargz.toc import Toc
from stargzfs.rafs import blobindex, chunks as chunk_plan
from stargzfs.rafs.blobmeta import decode_blob_meta

COMPRESSIONS = CODEC_NAMES
Progress = Callable[[int, int], None]  # (bytes fetched so far, bytes to fetch in all)


class MaterializeResult(msgspec.Struct, frozen=True):
    output: Path
    size: int  # bytes of the (sparse) cache file
    chunks: int  # distinct chunks written
    verified: int  # chunks checked against a TOC digest
    requests: int  # range reads made for chunk data
    bytes_fetched: int
    compression: str


async def _blob_size(reader: RangeReader, blob_size: int | None) -> int:
    if blob_size is not None:
        return blob_size
    known = getattr(reader, "size", None)
    if isinstance(known, int):
        return known
    _, size = await reader.read_tail(1)
    return size


async def materialize(
    blob_meta: bytes,
    reader: RangeReader,
    output: Path,
    *,
    toc: Toc | None = None,
    compression: str | None = None,
    blob_size: int | None = None,
    mode: int = 0o600,
    progress: Progress | None = None,
) -> MaterializeResult:
    """Build the cache file at `output` (temp file + rename: nothing partial on failure).

    `compression` None means detect it from the first chunk's magic bytes. The cache holds the
    layer's data uncompressed, so it is private (0600) unless the caller asks for a `mode`.
    `progress` hears after every range read how many of the planned bytes have arrived.
    """
    codec: Codec | None = None
    if compression is not None:
        try:
            codec = codec_named(compression)
        except FormatError as exc:
            raise UnsupportedError(str(exc)) from None
    _, entries = decode_blob_meta(blob_meta)
    digests = blobindex.build(toc, blob_meta).digests if toc is not None else None
    size = await _blob_size(reader, blob_size) if entries else 0
    planned = chunk_plan.plan(entries, digests=digests, blob_end=size)
    file_size = chunk_plan.cache_size(entries)
    output = Path(output)
    requests = fetched = 0
    spans = list(chunk_plan.spans(planned))
    total = sum(end - start for start, end, _ in spans)
    if progress is not None:
        progress(0, total)
    with atomic_output(output, mode=mode) as handle:
        for start, end, group in spans:
            data = await reader.read_range(start, end)
            requests += 1
            fetched += len(data)
            if progress is not None:
                progress(fetched, total)
            if len(data) != end - start:
                raise FormatError(f"blob read [{start}, {end}) returned {len(data)} bytes")
            view = memoryview(data)
            for chunk in group:
                piece = view[chunk.compressed_offset - start : chunk.read_end - start]
                if codec is None:
                    codec = codec_for_data(piece)
                handle.pwrite(chunk_plan.load(chunk, piece, codec), chunk.uncompressed_offset)
        handle.truncate(file_size)
    return MaterializeResult(
        output=output,
        size=file_size,
        chunks=len(planned),
        verified=sum(1 for chunk in planned if chunk.digest is not None),
        requests=requests,
        bytes_fetched=fetched,
        compression=codec.name if codec is not None else "none",
    )

"""Write the uncompressed blob cache nydusd's blobcache would hold for one layer.

Each blob.meta entry names a gzip member / zstd frame at a compressed offset of the layer
blob; its first `uncompressed_size` bytes land at `uncompressed_offset` of a sparse file.
That file is what the kernel's erofs driver reads through `device=` (rafs-v6 spec §9), so a
bootstrap can be mounted without nydusd.

v2.1 blob.meta files carry no usable compressed sizes, so each read is bounded by the next
entry's compressed offset, the blob size and a worst-case expansion bound. Neighbouring
ranges are fetched together so a registry sees few, large range requests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stargzfs.atomicio import atomic_output
from stargzfs.errors import FormatError, UnsupportedError, VerificationError
from stargzfs.estargz.codec import Codec
from stargzfs.estargz.codecs import CODEC_NAMES, codec_for_data, codec_named
from stargzfs.estargz.decompress import inflate_prefix
from stargzfs.estargz.toc import Chunk, Toc
from stargzfs.rafs.blobmeta import ChunkMeta, decode_blob_meta

PAGE_SIZE = 4096
MAX_SPAN = 32 << 20  # bytes fetched per range request at most (unless one chunk needs more)
MAX_GAP = 1 << 20  # unused bytes we accept reading to save a request
COMPRESSIONS = CODEC_NAMES
Progress = Callable[[int, int], None]  # (bytes fetched so far, bytes to fetch in all)


class RangeReader(Protocol):
    """What stargzfs.registry's BlobReader and stargzfs.estargz.fetch.FileRangeReader offer."""

    async def read_tail(self, length: int) -> tuple[bytes, int]: ...

    async def read_range(self, start: int, end: int) -> bytes: ...


@dataclass(frozen=True)
class MaterializeResult:
    output: Path
    size: int  # bytes of the (sparse) cache file
    chunks: int  # distinct chunks written
    verified: int  # chunks checked against a TOC digest
    requests: int  # range reads made for chunk data
    bytes_fetched: int
    compression: str


@dataclass(frozen=True)
class _Job:
    """One distinct chunk: where to read it and what to check it against."""

    index: int  # first blob.meta index, for error messages
    meta: ChunkMeta
    read_end: int  # exclusive end of the compressed bytes we fetch for it
    expected_digest: str | None


def _round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _worst_compressed_size(size: int) -> int:
    """Upper bound on the compressed bytes needed to inflate `size` bytes.

    Covers deflate stored blocks and zstd raw blocks (≤128 KiB each) with room to spare.
    """
    return size + size // 128 + (256 << 10)


def _distinct_chunks(chunks: Sequence[ChunkMeta]) -> list[tuple[int, ChunkMeta]]:
    """Drop hardlink duplicates (same record twice) and reject overlapping entries."""
    by_uoff: dict[int, tuple[int, ChunkMeta]] = {}
    by_coff: dict[int, ChunkMeta] = {}
    for index, chunk in enumerate(chunks):
        seen = by_uoff.get(chunk.uncompressed_offset)
        if seen is not None:
            if (seen[1].uncompressed_size, seen[1].compressed_offset) != (
                chunk.uncompressed_size,
                chunk.compressed_offset,
            ):
                raise FormatError(
                    f"blob.meta entries {seen[0]} and {index} share uncompressed offset "
                    f"{chunk.uncompressed_offset} but describe different chunks"
                )
            continue
        other = by_coff.get(chunk.compressed_offset)
        if other is not None:
            raise UnsupportedError(
                f"blob.meta entry {index}: compressed offset {chunk.compressed_offset} is shared with another "
                "chunk (an innerOffset layout that blob.meta cannot describe)"
            )
        by_uoff[chunk.uncompressed_offset] = (index, chunk)
        by_coff[chunk.compressed_offset] = chunk
    ordered = sorted(by_uoff.values(), key=lambda item: item[1].uncompressed_offset)
    for (_, previous), (index, chunk) in zip(ordered, ordered[1:]):
        if previous.uncompressed_offset + previous.uncompressed_size > chunk.uncompressed_offset:
            raise FormatError(f"blob.meta entry {index} overlaps the chunk before it in the uncompressed blob")
    return ordered


def _toc_digests(toc: Toc) -> dict[int, tuple[Chunk, str | None]]:
    """Compressed offset → (TOC chunk, expected sha256) from chunkDigest, or the file digest
    when a file is a single chunk (old stargz TOCs such as nydus's fixtures have no chunkDigest)."""
    by_offset: dict[int, tuple[Chunk, str | None]] = {}
    for entry in toc.entries:
        for chunk in entry.chunks:
            digest = chunk.digest
            if digest is None and len(entry.chunks) == 1 and chunk.size == entry.size:
                digest = entry.digest
            by_offset.setdefault(chunk.offset, (chunk, digest))
    return by_offset


def _plan(chunks: Sequence[ChunkMeta], blob_size: int, toc: Toc | None) -> list[_Job]:
    """One job per distinct chunk, sorted by compressed offset, each with its read bound."""
    distinct = _distinct_chunks(chunks)
    toc_chunks = _toc_digests(toc) if toc is not None else {}
    toc_offsets = set(toc_chunks)
    offsets = sorted({chunk.compressed_offset for _, chunk in distinct} | toc_offsets)
    next_offset = {offset: following for offset, following in zip(offsets, offsets[1:])}
    jobs: list[_Job] = []
    for index, chunk in distinct:
        coff, usize = chunk.compressed_offset, chunk.uncompressed_size
        if coff >= blob_size:
            raise FormatError(
                f"blob.meta entry {index}: compressed offset {coff} lies beyond the end of the {blob_size}-byte blob"
            )
        expected: str | None = None
        if toc is not None:
            found = toc_chunks.get(coff)
            if found is None:
                raise FormatError(f"blob.meta entry {index}: no TOC chunk starts at compressed offset {coff}")
            toc_chunk, expected = found
            if toc_chunk.inner_offset:
                raise UnsupportedError(
                    f"TOC chunk at compressed offset {coff} has innerOffset {toc_chunk.inner_offset}; "
                    "blob.meta cannot describe it"
                )
            if toc_chunk.size != usize:
                raise FormatError(
                    f"blob.meta entry {index}: {usize} bytes at compressed offset {coff}, the TOC says {toc_chunk.size}"
                )
        read_end = min(next_offset.get(coff, blob_size), blob_size, coff + _worst_compressed_size(usize))
        jobs.append(_Job(index, chunk, read_end, expected))
    jobs.sort(key=lambda job: job.meta.compressed_offset)
    return jobs


def _spans(jobs: Sequence[_Job]) -> Iterable[tuple[int, int, list[_Job]]]:
    """Group jobs (sorted by compressed offset) into (start, end, jobs) range reads."""
    group: list[_Job] = []
    start = end = 0
    for job in jobs:
        job_start = job.meta.compressed_offset
        if group and (job_start - end > MAX_GAP or max(end, job.read_end) - start > MAX_SPAN):
            yield start, end, group
            group = []
        if not group:
            start, end = job_start, job.read_end
        end = max(end, job.read_end)
        group.append(job)
    if group:
        yield start, end, group


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
    progress: Progress | None = None,
) -> MaterializeResult:
    """Build the cache file at `output` (temp file + rename: nothing partial on failure).

    `compression` None means detect it from the first chunk's magic bytes; `progress` hears
    after every range read how many of the planned bytes have arrived.
    """
    codec: Codec | None = None
    if compression is not None:
        try:
            codec = codec_named(compression)
        except FormatError as exc:
            raise UnsupportedError(str(exc)) from None
    _, chunks = decode_blob_meta(blob_meta)
    size = await _blob_size(reader, blob_size) if chunks else 0
    jobs = _plan(chunks, size, toc)
    file_size = _round_up(max((c.uncompressed_offset + c.uncompressed_size for c in chunks), default=0), PAGE_SIZE)
    output = Path(output)
    requests = fetched = verified = 0
    spans = list(_spans(jobs))
    planned = sum(end - start for start, end, _ in spans)
    if progress is not None:
        progress(0, planned)
    with atomic_output(output) as handle:
        for start, end, group in spans:
            data = await reader.read_range(start, end)
            requests += 1
            fetched += len(data)
            if progress is not None:
                progress(fetched, planned)
            if len(data) != end - start:
                raise FormatError(f"blob read [{start}, {end}) returned {len(data)} bytes")
            view = memoryview(data)
            for job in group:
                relative = job.meta.compressed_offset - start
                piece = view[relative : job.read_end - start]
                if codec is None:
                    codec = codec_for_data(piece)
                content = _inflate_job(job, piece, codec)
                if job.expected_digest is not None:
                    _verify(job, content)
                    verified += 1
                handle.pwrite(content, job.meta.uncompressed_offset)
        handle.truncate(file_size)
    return MaterializeResult(
        output=output,
        size=file_size,
        chunks=len(jobs),
        verified=verified,
        requests=requests,
        bytes_fetched=fetched,
        compression=codec.name if codec is not None else "none",
    )


def _inflate_job(job: _Job, data: memoryview, codec: Codec) -> bytes:
    coff, usize = job.meta.compressed_offset, job.meta.uncompressed_size
    try:
        return inflate_prefix(data, usize, codec)
    except FormatError as exc:
        raise FormatError(
            f"blob.meta entry {job.index} ({usize} bytes at compressed offset {coff}, "
            f"{len(data)} compressed bytes available): {exc}"
        ) from None


def _verify(job: _Job, content: bytes) -> None:
    expected = job.expected_digest or ""
    algorithm, _, hex_digest = expected.partition(":")
    if algorithm != "sha256" or len(hex_digest) != 64:
        raise FormatError(f"TOC digest {expected!r} for compressed offset {job.meta.compressed_offset} is not sha256")
    actual = hashlib.sha256(content).hexdigest()
    if actual != hex_digest.lower():
        raise VerificationError(
            f"chunk at compressed offset {job.meta.compressed_offset} has sha256:{actual}, the TOC says {expected}"
        )


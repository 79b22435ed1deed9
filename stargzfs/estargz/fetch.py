"""Detect eStargz and fetch its TOC in at most two range requests.

Upstream spends ~6 requests per layer (probe, size, footer twice, TOC) and verifies
nothing. Here one suffix read of `tail_size` bytes yields the blob size and the footer
and, for typical TOCs, the whole TOC member too; only a TOC larger than the window costs
a second read of exactly its range. The TOC digest is checked before the JSON is parsed.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from stargzfs.errors import FormatError, UnsupportedError, UsageError, VerificationError
from stargzfs.estargz.decompress import StreamDecoder, decompressor_for
from stargzfs.estargz.footer import MAX_FOOTER_SIZE, SKIPPABLE_FRAME_MAGIC, Footer, parse_footer
from stargzfs.estargz.toc import TOC_NAME, Chunk, Toc, parse_toc

DEFAULT_TAIL_SIZE = 64 * 1024
DEFAULT_MAX_TOC_SIZE = 150 * 1024 * 1024  # containers/storage's maxTocSize
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ZSTD_SKIPPABLE_HEADER_SIZE = 8

T = TypeVar("T")
Offload = Callable[[Callable[[], Toc]], Awaitable[Toc]]


class RangeReader(Protocol):
    """Random access to one blob (registry BlobReader or a local file)."""

    async def read_tail(self, length: int) -> tuple[bytes, int]:
        """(the last min(length, size) bytes, blob size) in one request."""
        ...

    async def read_range(self, start: int, end: int) -> bytes:
        """Exactly the bytes [start, end)."""
        ...


class FileRangeReader:
    """A local blob file behind the RangeReader protocol; counts requests like a registry."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.requests = 0
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    async def read_tail(self, length: int) -> tuple[bytes, int]:
        self.requests += 1
        with self.path.open("rb") as blob:
            size = blob.seek(0, io.SEEK_END)
            blob.seek(max(0, size - length))
            data = blob.read(length)
        self.bytes_read += len(data)
        return data, size

    async def read_range(self, start: int, end: int) -> bytes:
        self.requests += 1
        with self.path.open("rb") as blob:
            size = blob.seek(0, io.SEEK_END)
            if not 0 <= start <= end <= size:
                raise FormatError(f"{self.path}: range [{start}, {end}) is outside the {size}-byte blob")
            blob.seek(start)
            data = blob.read(end - start)
        self.bytes_read += len(data)
        return data

    def __repr__(self) -> str:
        return f"FileRangeReader({str(self.path)!r})"


@dataclass
class TocResult:
    footer: Footer
    toc: Toc
    raw: bytes  # == toc.raw, the verbatim `stargz.index.json`
    requests: int  # range requests this fetch made (1 or 2)
    bytes_fetched: int  # bytes transferred by those requests


async def fetch_toc(
    reader: RangeReader,
    *,
    tail_size: int = DEFAULT_TAIL_SIZE,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    expected_digest: str | None = None,
    offload: Offload | None = None,
) -> TocResult:
    """Footer → TOC → digest check → parsed TOC; NotEstargzError for a plain layer.

    Decoding and parsing a 100k-entry TOC is CPU work of seconds; a server passes
    `offload=trio.to_thread.run_sync` so its event loop keeps answering meanwhile.
    """
    if tail_size < MAX_FOOTER_SIZE:
        raise UsageError(f"tail size {tail_size} is below the {MAX_FOOTER_SIZE}-byte footer")
    if max_toc_size <= 0:
        raise UsageError(f"maximum TOC size must be positive, got {max_toc_size}")
    if expected_digest is not None and not _SHA256_DIGEST.fullmatch(expected_digest):
        raise UsageError(f"expected TOC digest {expected_digest!r} is not of the form sha256:<64 hex>")

    tail, blob_size = await reader.read_tail(tail_size)
    requests, fetched = 1, len(tail)
    if len(tail) != min(tail_size, blob_size):
        raise FormatError(f"short tail read: got {len(tail)} of {min(tail_size, blob_size)} bytes")
    footer = parse_footer(tail, blob_size)
    _check_sizes(footer, max_toc_size)

    # zstd: include the 8-byte skippable frame header so it can be checked as well
    start = footer.toc_offset - (_ZSTD_SKIPPABLE_HEADER_SIZE if footer.compression == "zstd" else 0)
    tail_start = blob_size - len(tail)
    if start >= tail_start:
        member = memoryview(tail)[start - tail_start : footer.toc_end - tail_start]
    else:
        member = memoryview(await reader.read_range(start, footer.toc_end))
        requests += 1
        fetched += len(member)
        if len(member) != footer.toc_end - start:
            raise FormatError(
                f"short TOC read: got {len(member)} of {footer.toc_end - start} bytes at offset {start}"
            )

    def decode() -> Toc:
        if footer.compression == "zstd":
            raw = _zstd_toc(member, footer, max_toc_size)
        else:
            raw = _gzip_toc(member, footer, max_toc_size)
        if expected_digest is not None:
            actual = "sha256:" + hashlib.sha256(raw).hexdigest()
            if actual != expected_digest:
                raise VerificationError(
                    f"TOC digest mismatch: the blob's TOC is {actual}, the layer label says {expected_digest}"
                )
        return parse_toc(raw)

    toc = decode() if offload is None else await offload(decode)
    return TocResult(footer=footer, toc=toc, raw=toc.raw, requests=requests, bytes_fetched=fetched)


def _check_sizes(footer: Footer, max_toc_size: int) -> None:
    """Refuse before fetching anything more when the footer already announces a huge TOC."""
    if footer.toc_compressed_size > max_toc_size:
        raise FormatError(
            f"compressed TOC is {footer.toc_compressed_size} bytes, over the "
            f"{max_toc_size}-byte limit (raise --max-toc-size if this is expected)"
        )
    ulen = footer.toc_uncompressed_size
    if ulen is not None and ulen > max_toc_size:
        raise FormatError(
            f"TOC is {ulen} bytes uncompressed (zstd footer), over the {max_toc_size}-byte limit "
            "(raise --max-toc-size if this is expected)"
        )


def _gzip_toc(member: memoryview, footer: Footer, max_toc_size: int) -> bytes:
    """The first tar entry of the first gzip member must be stargz.index.json."""
    where = f"TOC gzip member at offset {footer.toc_offset}"
    # tar headers (and a PAX record) precede the JSON: allow them on top of the JSON cap
    stream = decompressor_for("gzip").open_stream(member, limit=max_toc_size + 64 * 1024)
    try:
        with tarfile.open(fileobj=_StreamFile(stream), mode="r|") as archive:
            entry = archive.next()
            if entry is None:
                raise FormatError(f"{where} holds an empty tar stream, no {TOC_NAME}")
            if entry.name != TOC_NAME:
                raise FormatError(f"{where} starts with tar entry {entry.name!r}, not {TOC_NAME}")
            if entry.size > max_toc_size:
                raise FormatError(
                    f"TOC is {entry.size} bytes uncompressed (tar header), over the "
                    f"{max_toc_size}-byte limit (raise --max-toc-size if this is expected)"
                )
            payload = archive.extractfile(entry)
            raw = payload.read() if payload is not None else b""
    except _DecodeFailure as exc:
        raise FormatError(f"{where}: {exc}") from None
    except (tarfile.TarError, EOFError) as exc:
        raise FormatError(f"{where} is not a tar stream: {exc}") from None
    if len(raw) != entry.size:
        raise FormatError(f"{where} is truncated: {len(raw)} of {entry.size} TOC bytes")
    return raw


def _zstd_toc(member: memoryview, footer: Footer, max_toc_size: int) -> bytes:
    """zstd TOC: a skippable frame header, then one zstd frame holding the bare JSON."""
    header = bytes(member[:_ZSTD_SKIPPABLE_HEADER_SIZE])
    expected_header = SKIPPABLE_FRAME_MAGIC + footer.toc_compressed_size.to_bytes(4, "little")
    if header != expected_header:
        raise FormatError(
            f"zstd TOC at offset {footer.toc_offset} is not wrapped in a skippable frame of "
            f"{footer.toc_compressed_size} bytes (found {header.hex()})"
        )
    frame = member[_ZSTD_SKIPPABLE_HEADER_SIZE:]
    try:
        raw = decompressor_for("zstd").first_member(frame, min(max_toc_size, footer.toc_uncompressed_size or 0))
    except FormatError as exc:
        raise FormatError(f"zstd TOC frame at offset {footer.toc_offset}: {exc}") from None
    if len(raw) != footer.toc_uncompressed_size:
        raise FormatError(
            f"zstd TOC frame at offset {footer.toc_offset} decodes to {len(raw)} bytes, "
            f"the footer says {footer.toc_uncompressed_size}"
        )
    return raw


class _DecodeFailure(Exception):
    """A decompression error surfacing through tarfile, kept apart from tar-level errors."""


class _StreamFile(io.RawIOBase):
    """File-like view of a StreamDecoder for tarfile's streaming mode."""

    def __init__(self, stream: StreamDecoder) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        try:
            return self._stream.read(-1 if size is None else size)
        except FormatError as exc:
            raise _DecodeFailure(str(exc)) from None

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def read_toc_file(path: Path, **kwargs: Any) -> TocResult:
    """Synchronous fetch_toc over a local blob file (tests, `stargzfs-image materialize`)."""
    return _run_without_loop(fetch_toc(FileRangeReader(path), **kwargs))


def _run_without_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (local file I/O) without an event loop.

    trio.run cannot nest, and callers may already be inside one.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("read_toc_file: the reader suspended; use fetch_toc inside an event loop")


COMPRESSIONS = ("gzip", "zstd")


def inflate_prefix(
    data: bytes | memoryview, size: int, compression: str, *, skip: int = 0, multi_member: bool = False
) -> bytes:
    """Exactly `size` uncompressed bytes, after skipping `skip`, of the stream at the start of `data`.

    The one chunk decoder (TOC chunks here, blob.meta chunks in rafs.materialize): output
    past `skip + size` is expected (legacy stargz members also hold tar padding and the
    next entries' headers) and simply not produced; fewer bytes is a FormatError.
    `multi_member` continues into following gzip members / zstd frames, as upstream does
    for ranges that cross parallel-build part boundaries.
    """
    if compression not in COMPRESSIONS:
        raise UnsupportedError(f"unknown compression {compression!r} (expected gzip or zstd)")
    stream = decompressor_for(compression).open_stream(data, limit=None, multi_member=multi_member)
    skipped = 0
    while skipped < skip:
        piece = stream.read(min(skip - skipped, 1 << 20))
        if not piece:
            break
        skipped += len(piece)
    out = stream.read(size) if skipped == skip else b""
    if len(out) < size:
        raise FormatError(f"{compression} data decodes to {skipped + len(out)} bytes, needs {skip + size}")
    return out


def read_chunk(blob: bytes | memoryview, chunk: Chunk, next_offset: int, compression: str) -> bytes:
    """Uncompressed bytes of one TOC chunk from a whole blob in memory (innerOffset honoured)."""
    view = memoryview(blob).cast("B")
    if not 0 <= chunk.offset < next_offset <= len(view):
        raise FormatError(
            f"chunk range [{chunk.offset}, {next_offset}) is outside the {len(view)}-byte blob"
        )
    try:
        return inflate_prefix(
            view[chunk.offset : next_offset], chunk.size, compression, skip=chunk.inner_offset, multi_member=True
        )
    except FormatError as exc:
        raise FormatError(
            f"chunk at offset {chunk.offset}: {exc} (innerOffset {chunk.inner_offset} + size {chunk.size})"
        ) from None

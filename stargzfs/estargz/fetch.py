"""Detect eStargz and fetch its TOC in at most two range requests.

Upstream spends ~6 requests per layer (probe, size, footer twice, TOC) and verifies
nothing. Here one suffix read of `tail_size` bytes yields the blob size and the footer
and, for typical TOCs, the whole TOC member too; only a TOC larger than the window costs
a second read of exactly its range. The TOC digest is checked before the JSON is parsed.

`parse=False` stops after the digest check: the FUSE daemon hands the verified bytes to
the builder subprocess, which parses them once, in a process whose memory is capped.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from stargzfs.digest import require_sha256, sha256_digest
from stargzfs.errors import FormatError, UsageError, VerificationError
from stargzfs.estargz.codec import Codec, Footer
from stargzfs.estargz.codecs import codec_named
from stargzfs.estargz.footer import MAX_FOOTER_SIZE, parse_footer
from stargzfs.estargz.toc import Toc, parse_toc

DEFAULT_TAIL_SIZE = 64 * 1024
DEFAULT_MAX_TOC_SIZE = 150 * 1024 * 1024  # containers/storage's maxTocSize

T = TypeVar("T")
Offload = Callable[[Callable[[], T]], Awaitable[T]]


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

    async def read_range(self, start: int, end: int, *, up_to_end: bool = False) -> bytes:
        """`up_to_end`: an `end` past the blob reads to its end (the registry reader's rule)."""
        self.requests += 1
        with self.path.open("rb") as blob:
            size = blob.seek(0, io.SEEK_END)
            if up_to_end:
                end = min(end, size)
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
    toc: Toc | None  # None when fetched with parse=False
    raw: bytes  # the verbatim `stargz.index.json` (== toc.raw)
    requests: int  # range requests this fetch made (1 or 2)
    bytes_fetched: int  # bytes transferred by those requests

    @property
    def codec(self) -> Codec:
        return codec_named(self.footer.compression)


async def fetch_toc(
    reader: RangeReader,
    *,
    tail_size: int = DEFAULT_TAIL_SIZE,
    max_toc_size: int = DEFAULT_MAX_TOC_SIZE,
    expected_digest: str | None = None,
    offload: Offload | None = None,
    parse: bool = True,
) -> TocResult:
    """Footer → TOC → digest check → parsed TOC; NotEstargzError for a plain layer.

    Decompressing and parsing a large TOC is CPU work of up to seconds; a server passes
    `offload=trio.to_thread.run_sync` so its event loop keeps answering meanwhile.
    `parse=False` returns the verified bytes only (`TocResult.toc` is None).
    """
    if tail_size < MAX_FOOTER_SIZE:
        raise UsageError(f"tail size {tail_size} is below the {MAX_FOOTER_SIZE}-byte footer")
    if max_toc_size <= 0:
        raise UsageError(f"maximum TOC size must be positive, got {max_toc_size}")
    if expected_digest is not None:
        require_sha256(expected_digest, "expected TOC digest")

    tail, blob_size = await reader.read_tail(tail_size)
    requests, fetched = 1, len(tail)
    if len(tail) != min(tail_size, blob_size):
        raise FormatError(f"short tail read: got {len(tail)} of {min(tail_size, blob_size)} bytes")
    footer = parse_footer(tail, blob_size)
    _check_sizes(footer, max_toc_size)

    codec = codec_named(footer.compression)
    start = codec.toc_member_start(footer)
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

    def decode() -> tuple[bytes, Toc | None]:
        raw = codec.read_toc(member, footer, max_toc_size)
        if expected_digest is not None:
            actual = sha256_digest(raw)
            if actual != expected_digest:
                raise VerificationError(
                    f"TOC digest mismatch: the blob's TOC is {actual}, the layer label says {expected_digest}"
                )
        return raw, parse_toc(raw) if parse else None

    raw, toc = decode() if offload is None else await offload(decode)
    return TocResult(footer=footer, toc=toc, raw=raw, requests=requests, bytes_fetched=fetched)


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
            f"TOC is {ulen} bytes uncompressed ({footer.kind} footer), over the {max_toc_size}-byte limit "
            "(raise --max-toc-size if this is expected)"
        )


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

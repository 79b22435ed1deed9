"""One streaming, size-capped decompression interface for gzip members and zstd frames.

eStargz readers must decode exactly one member/frame (the TOC, or the one a chunk
starts in) and never trust the producer about sizes: a few KiB of compressed input can
expand to gigabytes. Output is therefore produced incrementally and counted against a
hard limit, so memory stays bounded by the limit plus one step's worth of output.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import zstandard

from stargzfs.errors import FormatError

#: gzip: compressed bytes handed to zlib per step and most output taken per step.
_GZIP_INPUT_STEP = 64 * 1024
_GZIP_OUTPUT_STEP = 1024 * 1024
#: zstd has no output cap per call; 256 input bytes expand to at most ~8 MiB (ratio ~32768).
_ZSTD_INPUT_STEP = 256


class StreamDecoder(Protocol):
    def read(self, size: int = -1) -> bytes:
        """Up to `size` uncompressed bytes (all remaining for -1); b"" once the stream ended."""
        ...

    @property
    def produced(self) -> int:
        """Uncompressed bytes decoded so far (including buffered, unread ones)."""
        ...


class Decompressor(Protocol):
    name: str

    def first_member(self, data: bytes | memoryview, limit: int) -> bytes:
        """Decode exactly the first member/frame of `data`; FormatError past `limit` or if truncated."""
        ...

    def open_stream(
        self, first_bytes: bytes | memoryview, *, limit: int | None = None, multi_member: bool = False
    ) -> StreamDecoder:
        """Incremental decoder over `first_bytes` (the whole compressed range)."""
        ...


class _CappedStream:
    """Pull-based decoder: `_step()` turns some input into output until the stream ends."""

    name = "compressed"

    def __init__(self, data: bytes | memoryview, limit: int | None, multi_member: bool) -> None:
        self._input = memoryview(data).cast("B")
        self._pos = 0
        self._limit = limit
        self._multi = multi_member
        self._buffer = bytearray()
        self._produced = 0
        self._done = False
        self._members = 0

    @property
    def produced(self) -> int:
        return self._produced

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            self._step()
        if size < 0 or size >= len(self._buffer):
            out = bytes(self._buffer)
            self._buffer.clear()
        else:
            out = bytes(self._buffer[:size])
            del self._buffer[:size]
        return out

    def _emit(self, chunk: bytes) -> None:
        self._produced += len(chunk)
        if self._limit is not None and self._produced > self._limit:
            self._done = True
            self._buffer.clear()
            raise FormatError(
                f"{self.name} data expands past the {self._limit}-byte limit "
                f"(compressed input {len(self._input)} bytes)"
            )
        self._buffer += chunk

    def _member_finished(self, unused: bytes) -> None:
        """After a member/frame ends: stop, or continue with the next one in the input."""
        self._members += 1
        self._pos -= len(unused)
        if not self._multi or self._pos >= len(self._input):
            self._done = True
        else:
            self._new_member()

    def _truncated(self) -> None:
        self._done = True
        raise FormatError(
            f"{self.name} data is truncated: input ended inside member #{self._members + 1} "
            f"after {len(self._input)} compressed bytes"
        )

    def _step(self) -> None:
        """Decode one bounded piece of input into the buffer (subclasses)."""
        raise NotImplementedError

    def _new_member(self) -> None:
        """Reset the codec state for the next member/frame (subclasses)."""
        raise NotImplementedError


class _GzipStream(_CappedStream):
    name = "gzip"

    def __init__(self, data: bytes | memoryview, limit: int | None, multi_member: bool) -> None:
        super().__init__(data, limit, multi_member)
        self._new_member()

    def _new_member(self) -> None:
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""

    def _step(self) -> None:
        if not self._pending:
            if self._pos >= len(self._input):
                self._truncated()
            self._pending = bytes(self._input[self._pos : self._pos + _GZIP_INPUT_STEP])
            self._pos += len(self._pending)
        try:
            chunk = self._zlib.decompress(self._pending, _GZIP_OUTPUT_STEP)
        except zlib.error as exc:
            self._done = True
            raise FormatError(f"gzip data is corrupt in member #{self._members + 1}: {exc}") from None
        self._pending = self._zlib.unconsumed_tail
        self._emit(chunk)
        if self._zlib.eof:
            self._member_finished(self._zlib.unused_data + self._pending)


class _ZstdStream(_CappedStream):
    name = "zstd"

    def __init__(self, data: bytes | memoryview, limit: int | None, multi_member: bool) -> None:
        super().__init__(data, limit, multi_member)
        self._new_member()

    def _new_member(self) -> None:
        self._zstd = zstandard.ZstdDecompressor().decompressobj()

    def _step(self) -> None:
        if self._pos >= len(self._input):
            self._truncated()
        piece = bytes(self._input[self._pos : self._pos + _ZSTD_INPUT_STEP])
        self._pos += len(piece)
        try:
            chunk = self._zstd.decompress(piece)
        except zstandard.ZstdError as exc:
            self._done = True
            raise FormatError(f"zstd data is corrupt in frame #{self._members + 1}: {exc}") from None
        self._emit(chunk)
        if self._zstd.eof:
            self._member_finished(self._zstd.unused_data)


class _Codec:
    def __init__(self, name: str, stream: Callable[[bytes | memoryview, int | None, bool], _CappedStream]) -> None:
        self.name = name
        self._stream = stream

    def open_stream(
        self, first_bytes: bytes | memoryview, *, limit: int | None = None, multi_member: bool = False
    ) -> StreamDecoder:
        return self._stream(first_bytes, limit, multi_member)

    def first_member(self, data: bytes | memoryview, limit: int) -> bytes:
        return self.open_stream(data, limit=limit).read()

    def __repr__(self) -> str:
        return f"<{self.name} decompressor>"


GZIP = _Codec("gzip", _GzipStream)
ZSTD = _Codec("zstd", _ZstdStream)
_CODECS: dict[str, Decompressor] = {"gzip": GZIP, "zstd": ZSTD}


def decompressor_for(compression: str) -> Decompressor:
    try:
        return _CODECS[compression]
    except KeyError:
        raise FormatError(f"unknown eStargz compression {compression!r} (expected gzip or zstd)") from None

"""What every eStargz compression must provide, and the size-capped stream both share.

One `Codec` object per compression (gzip_codec.GZIP, zstd_codec.ZSTD) owns everything that
differs between them: its footer layouts, how the TOC member is wrapped, how members or
frames are decoded, the builder flag, and how to write each of these (tests and benchmarks
craft layers with the same object). stargz-snapshotter's `estargz/` splits its format the
same way, so one conformance suite runs over every codec (tests/test_estargz_codecs.py).

Decoding never trusts the producer about sizes: a few KiB of compressed input can expand to
gigabytes, so output is produced incrementally and counted against a hard limit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import msgspec

from stargzfs.errors import FormatError


class Footer(msgspec.Struct, frozen=True):
    """Where the TOC is; offsets are compressed blob offsets, all validated against the blob size."""

    kind: str  # "estargz" (51 B gzip), "legacy" (47 B gzip), "zstd" (48 B skippable frame)
    size: int  # footer length in bytes
    toc_offset: int  # where the TOC gzip member / zstd frame starts
    toc_end: int  # exclusive end of the compressed TOC bytes
    toc_uncompressed_size: int | None  # zstd footer's ulen; None for gzip
    payload_end: int  # end of the last data member (nextOffset of the last chunk)
    compression: str  # the codec's name

    @property
    def toc_compressed_size(self) -> int:
        return self.toc_end - self.toc_offset


class StreamDecoder(Protocol):
    def read(self, size: int = -1) -> bytes:
        """Up to `size` uncompressed bytes (all remaining for -1); b"" once the stream ended."""
        ...

    @property
    def produced(self) -> int:
        """Uncompressed bytes decoded so far (including buffered, unread ones)."""
        ...


class CappedStream(ABC):
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
        self._new_member()

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

    def _next_input(self, step: int) -> bytes:
        """The next `step` compressed bytes; a FormatError when the input ended mid-member."""
        if self._pos >= len(self._input):
            self._done = True
            raise FormatError(
                f"{self.name} data is truncated: input ended inside member #{self._members + 1} "
                f"after {len(self._input)} compressed bytes"
            )
        piece = bytes(self._input[self._pos : self._pos + step])
        self._pos += len(piece)
        return piece

    def _corrupt(self, exc: Exception) -> FormatError:
        self._done = True
        return FormatError(f"{self.name} data is corrupt in member #{self._members + 1}: {exc}")

    def _member_finished(self, unused: bytes) -> None:
        """After a member/frame ends: stop, or continue with the next one in the input."""
        self._members += 1
        self._pos -= len(unused)
        if not self._multi or self._pos >= len(self._input):
            self._done = True
        else:
            self._new_member()

    @abstractmethod
    def _step(self) -> None:
        """Decode one bounded piece of input into the buffer."""

    @abstractmethod
    def _new_member(self) -> None:
        """Reset the codec state for the next member/frame."""


class Codec(ABC):
    """One eStargz compression: reading (detection, TOC, chunks), the builder flag, writing."""

    name: str  # "gzip" | "zstd": Footer.compression, the builder's --compressor, RAFS flag names
    magic: bytes  # how every member/frame of this codec starts
    footer_sizes: tuple[int, ...]  # sizes of the footers parse_footer may find
    stream: type[CappedStream]

    # ------------------------------------------------------------------ decoding
    def open_stream(
        self, first_bytes: bytes | memoryview, *, limit: int | None = None, multi_member: bool = False
    ) -> StreamDecoder:
        """Incremental decoder over `first_bytes` (the whole compressed range)."""
        return self.stream(first_bytes, limit, multi_member)

    def first_member(self, data: bytes | memoryview, limit: int) -> bytes:
        """Decode exactly the first member/frame of `data`; FormatError past `limit` or if truncated."""
        return self.open_stream(data, limit=limit).read()

    # ------------------------------------------------------------------ layout
    @abstractmethod
    def parse_footer(self, tail: bytes, blob_size: int) -> Footer | None:
        """This codec's footer at the end of `tail`; None when the tail does not end with one.

        A footer that carries this codec's signature but is damaged is a FormatError; one it
        recognises as a variant stargzfs does not serve is an UnsupportedError.
        """

    def toc_member_start(self, footer: Footer) -> int:
        """Where the bytes `read_toc` needs begin (a wrapper header may precede the TOC offset)."""
        return footer.toc_offset

    @abstractmethod
    def read_toc(self, member: memoryview, footer: Footer, max_toc_size: int) -> bytes:
        """The TOC JSON from the compressed bytes [toc_member_start, toc_end)."""

    def builder_args(self) -> list[str]:
        """What `nydus-image create` needs to hear about this compression (nothing for gzip)."""
        return ["--compressor", self.name]

    # ------------------------------------------------------------------ writing
    @abstractmethod
    def compress(self, data: bytes, level: int | None = None) -> bytes:
        """One member/frame holding `data`."""

    @abstractmethod
    def encode_toc_and_footer(self, toc_json: bytes, toc_offset: int, *, legacy: bool = False) -> bytes:
        """What follows the last data member at `toc_offset`: the wrapped TOC, then the footer."""

    def __repr__(self) -> str:
        return f"<{self.name} codec>"

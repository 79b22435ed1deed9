"""gzip eStargz (estargz.md §A1-A2, §A8): gzip members, the 51- and 47-byte footers, and a
TOC stored as the first entry of a tar stream in its own member.

Both gzip footers put `STARGZ` 19 bytes from the end; the gzip header decides which one.
The 46-byte external-TOC footer is recognised and refused (its TOC lives in another image).
Upstream trusts every offset it reads; here each one is bounds-checked against the blob size.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from stargzfs.errors import FormatError, UnsupportedError
from stargzfs.estargz.codec import CappedStream, Codec, Footer, StreamDecoder
from stargzfs.estargz.toc import TOC_NAME

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
EXTERNAL_TOC_FOOTER_SIZE = 46
STARGZ_MAGIC = b"STARGZ"
EXTERNAL_TOC_MAGIC = b"STARGZEXTERNALTOC"

_GZIP_ID = b"\x1f\x8b\x08"
_FEXTRA = 0x04
_HEADER_FLAGS = 0x1E  # FHCRC | FEXTRA | FNAME | FCOMMENT: only FEXTRA fits a fixed-size footer
_EMPTY_DEFLATE_TAIL = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
#: compressed bytes handed to zlib per step and most output taken per step
_INPUT_STEP = 64 * 1024
_OUTPUT_STEP = 1024 * 1024
#: tar headers (and a PAX record) precede the TOC JSON in its member
_TAR_OVERHEAD = 64 * 1024


class GzipStream(CappedStream):
    name = "gzip"

    def _new_member(self) -> None:
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""

    def _step(self) -> None:
        if not self._pending:
            self._pending = self._next_input(_INPUT_STEP)
        try:
            chunk = self._zlib.decompress(self._pending, _OUTPUT_STEP)
        except zlib.error as exc:
            raise self._corrupt(exc) from None
        self._pending = self._zlib.unconsumed_tail
        self._emit(chunk)
        if self._zlib.eof:
            self._member_finished(self._zlib.unused_data + self._pending)


class GzipCodec(Codec):
    name = "gzip"
    magic = b"\x1f\x8b"
    footer_sizes = (ESTARGZ_FOOTER_SIZE, LEGACY_FOOTER_SIZE)
    stream = GzipStream

    def builder_args(self) -> list[str]:
        return []  # nydus-image v2.1's only (and default) stargz compression

    # ------------------------------------------------------------------ footer
    def parse_footer(self, tail: bytes, blob_size: int) -> Footer | None:
        if tail[-30:-13] == EXTERNAL_TOC_MAGIC:
            raise UnsupportedError(
                "blob has an external-TOC eStargz footer (STARGZEXTERNALTOC); "
                "TOCs stored in a separate image are not supported"
            )
        if tail[-19:-13] != STARGZ_MAGIC:
            return None
        problems: list[str] = []
        if blob_size >= ESTARGZ_FOOTER_SIZE and len(tail) >= ESTARGZ_FOOTER_SIZE:
            footer = tail[-ESTARGZ_FOOTER_SIZE:]
            problem = _header_problem(footer, xlen=26)
            if problem is None and footer[12:16] != b"SG\x16\x00":
                problem = "subfield is not SG with length 22"
            if problem is None:
                return _footer("estargz", footer[16:32], ESTARGZ_FOOTER_SIZE, blob_size)
            problems.append(f"51-byte form: {problem}")
        footer = tail[-LEGACY_FOOTER_SIZE:]
        problem = _header_problem(footer, xlen=22)
        if problem is None:
            return _footer("legacy", footer[12:28], LEGACY_FOOTER_SIZE, blob_size)
        problems.append(f"47-byte form: {problem}")
        raise FormatError("corrupt eStargz footer (" + "; ".join(problems) + ")")

    # ------------------------------------------------------------------ TOC member
    def read_toc(self, member: memoryview, footer: Footer, max_toc_size: int) -> bytes:
        """The first tar entry of the first gzip member must be stargz.index.json."""
        import tarfile  # only where a TOC member is read: builders start without it

        where = f"TOC gzip member at offset {footer.toc_offset}"
        stream = self.open_stream(member, limit=max_toc_size + _TAR_OVERHEAD)
        try:
            with tarfile.open(fileobj=_StreamFile(stream), mode="r|") as archive:
                entry = archive.next()
                if entry is None:
                    raise FormatError(f"{where} holds an empty tar stream, no {TOC_NAME}")
                if entry.name != TOC_NAME:
                    raise FormatError(f"{where} starts with tar entry {entry.name[:200]!r}, not {TOC_NAME}")
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

    # ------------------------------------------------------------------ writing
    def compress(self, data: bytes, level: int | None = None) -> bytes:
        import gzip

        return gzip.compress(data, compresslevel=9 if level is None else level, mtime=0)

    def encode_toc_and_footer(self, toc_json: bytes, toc_offset: int, *, legacy: bool = False) -> bytes:
        return self.compress(toc_tar(toc_json)) + encode_footer(toc_offset, legacy=legacy)


def _header_problem(footer: bytes, *, xlen: int) -> str | None:
    if footer[:3] != _GZIP_ID:
        return f"gzip magic/method is {footer[:3].hex()}, not 1f8b08"
    flags = footer[3]
    if flags & _HEADER_FLAGS != _FEXTRA:
        return f"gzip flags 0x{flags:02x} do not select FEXTRA only"
    actual_xlen = int.from_bytes(footer[10:12], "little")
    if actual_xlen != xlen:
        return f"XLEN is {actual_xlen}, not {xlen}"
    if footer[-13:] != _EMPTY_DEFLATE_TAIL:
        return "the footer member is not an empty stored deflate block with zero CRC/ISIZE"
    return None


def _footer(kind: str, hex_field: bytes, size: int, blob_size: int) -> Footer:
    if len(hex_field) != 16 or not set(hex_field) <= _HEX_DIGITS:
        text = hex_field.decode("ascii", "replace")
        raise FormatError(f"corrupt {kind} footer: TOC offset field {text!r} is not 16 hex digits")
    toc_offset = int(hex_field, 16)
    toc_end = blob_size - size
    if not 0 < toc_offset < toc_end:
        raise FormatError(
            f"{kind} footer points the TOC at offset {toc_offset}, outside the blob "
            f"(must be in (0, {toc_end}) for a {blob_size}-byte blob)"
        )
    return Footer(kind, size, toc_offset, toc_end, None, toc_offset, "gzip")


def encode_footer(toc_offset: int, *, legacy: bool = False) -> bytes:
    """The exact footer bytes Go's estargz writer emits."""
    field = b"%016x" % toc_offset + STARGZ_MAGIC
    extra = field if legacy else b"SG" + struct.pack("<H", len(field)) + field
    header = _GZIP_ID + bytes([_FEXTRA]) + b"\x00" * 4 + b"\x00\xff"
    return header + struct.pack("<H", len(extra)) + extra + _EMPTY_DEFLATE_TAIL


def toc_tar(json_bytes: bytes, name: str = TOC_NAME) -> bytes:
    """The uncompressed TOC member: tar header, JSON, padding, end-of-archive."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size = len(json_bytes)
        archive.addfile(info, io.BytesIO(json_bytes))
    return buffer.getvalue()


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


GZIP = GzipCodec()

"""eStargz footers: tell an eStargz blob from a plain layer and locate its TOC.

Four footers exist (estargz.md §A2, §A6): the 51-byte eStargz gzip footer, the 47-byte
legacy stargz one, the 48-byte zstd skippable frame, and the 46-byte external-TOC
footer (recognised, unsupported). Upstream trusts every offset it reads; here every
offset is bounds-checked against the blob size, because a bogus footer must never
turn into a huge or negative range request.
"""

from __future__ import annotations

import string
import struct
from dataclasses import dataclass

from stargzfs.errors import FormatError, NotEstargzError, UnsupportedError

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 48
EXTERNAL_TOC_FOOTER_SIZE = 46
MAX_FOOTER_SIZE = ESTARGZ_FOOTER_SIZE
MIN_FOOTER_SIZE = LEGACY_FOOTER_SIZE  # the 46-byte form is only ever reported as unsupported

STARGZ_MAGIC = b"STARGZ"
EXTERNAL_TOC_MAGIC = b"STARGZEXTERNALTOC"
ZSTD_MAGIC = b"GnUlInUx"
ZSTD_V2_MAGIC = b"GNUlInUx"  # containers/storage >= 1.50: 64-byte payload + tar-split
SKIPPABLE_FRAME_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_MANIFEST_TYPE_TOC = 1

_GZIP_ID = b"\x1f\x8b\x08"
_FEXTRA = 0x04
_HEADER_FLAGS = 0x1E  # FHCRC | FEXTRA | FNAME | FCOMMENT: only FEXTRA fits a fixed-size footer
_EMPTY_DEFLATE_TAIL = b"\x01\x00\x00\xff\xff" + b"\x00" * 8
_HEX_DIGITS = frozenset(string.hexdigits.encode())


@dataclass(frozen=True)
class Footer:
    """Where the TOC is; offsets are compressed blob offsets, all validated."""

    kind: str  # "estargz" (51 B gzip), "legacy" (47 B gzip), "zstd" (48 B skippable frame)
    size: int  # footer length in bytes
    toc_offset: int  # where the TOC gzip member / zstd frame starts
    toc_end: int  # exclusive end of the compressed TOC bytes
    toc_uncompressed_size: int | None  # zstd footer's ulen; None for gzip
    payload_end: int  # end of the last data member (nextOffset of the last chunk)
    compression: str  # "gzip" | "zstd"

    @property
    def toc_compressed_size(self) -> int:
        return self.toc_end - self.toc_offset


def parse_footer(tail: bytes, blob_size: int) -> Footer:
    """Detect the footer in `tail`, the last len(tail) bytes of a blob of `blob_size` bytes.

    NotEstargzError is the normal answer for a plain layer; a blob that carries an
    eStargz signature but is damaged is a FormatError, so corruption is never mistaken
    for "just a plain layer".
    """
    if len(tail) > blob_size:
        raise ValueError(f"tail of {len(tail)} bytes is longer than the {blob_size}-byte blob")
    if len(tail) < min(blob_size, MAX_FOOTER_SIZE):
        raise ValueError(f"need the last {MAX_FOOTER_SIZE} bytes of the blob, got {len(tail)}")
    tail = bytes(tail[-MAX_FOOTER_SIZE:])
    if blob_size < MIN_FOOTER_SIZE:
        raise NotEstargzError(f"not eStargz: the blob is only {blob_size} bytes, too small for a footer")

    if tail.endswith(ZSTD_MAGIC) and blob_size >= ZSTD_FOOTER_SIZE:
        return _parse_zstd(tail[-ZSTD_FOOTER_SIZE:], blob_size)
    if tail.endswith(ZSTD_V2_MAGIC):
        raise UnsupportedError(
            "blob has a containers/storage zstd:chunked v2 footer (GNUlInUx); "
            "only stargz-snapshotter's zstdchunked footer (GnUlInUx) is supported"
        )
    if tail[-30:-13] == EXTERNAL_TOC_MAGIC:
        raise UnsupportedError(
            "blob has an external-TOC eStargz footer (STARGZEXTERNALTOC); "
            "TOCs stored in a separate image are not supported"
        )
    if tail[-19:-13] == STARGZ_MAGIC:
        return _parse_gzip(tail, blob_size)
    raise NotEstargzError("not eStargz: the blob ends without an eStargz footer (plain layer)")


def _parse_gzip(tail: bytes, blob_size: int) -> Footer:
    """Both gzip footers put STARGZ 19 bytes from the end; the header decides which one."""
    problems: list[str] = []
    if blob_size >= ESTARGZ_FOOTER_SIZE and len(tail) >= ESTARGZ_FOOTER_SIZE:
        footer = tail[-ESTARGZ_FOOTER_SIZE:]
        problem = _gzip_header_problem(footer, xlen=26)
        if problem is None and footer[12:16] != b"SG\x16\x00":
            problem = "subfield is not SG with length 22"
        if problem is None:
            return _gzip_footer("estargz", footer[16:32], ESTARGZ_FOOTER_SIZE, blob_size)
        problems.append(f"51-byte form: {problem}")
    footer = tail[-LEGACY_FOOTER_SIZE:]
    problem = _gzip_header_problem(footer, xlen=22)
    if problem is None:
        return _gzip_footer("legacy", footer[12:28], LEGACY_FOOTER_SIZE, blob_size)
    problems.append(f"47-byte form: {problem}")
    raise FormatError("corrupt eStargz footer (" + "; ".join(problems) + ")")


def _gzip_header_problem(footer: bytes, *, xlen: int) -> str | None:
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


def _gzip_footer(kind: str, hex_field: bytes, size: int, blob_size: int) -> Footer:
    if len(hex_field) != 16 or not set(hex_field) <= _HEX_DIGITS:
        raise FormatError(f"corrupt {kind} footer: TOC offset field {hex_field.decode('ascii', 'replace')!r} is not 16 hex digits")
    toc_offset = int(hex_field, 16)
    toc_end = blob_size - size
    if not 0 < toc_offset < toc_end:
        raise FormatError(
            f"{kind} footer points the TOC at offset {toc_offset}, outside the blob "
            f"(must be in (0, {toc_end}) for a {blob_size}-byte blob)"
        )
    return Footer(kind, size, toc_offset, toc_end, None, toc_offset, "gzip")


def _parse_zstd(footer: bytes, blob_size: int) -> Footer:
    if footer[:8] != SKIPPABLE_FRAME_MAGIC + struct.pack("<I", 40):
        raise FormatError(
            f"corrupt zstd eStargz footer: skippable frame header is {footer[:8].hex()}, "
            f"not {SKIPPABLE_FRAME_MAGIC.hex()}28000000"
        )
    toc_offset, clen, ulen, manifest_type = struct.unpack("<4Q", footer[8:40])
    if manifest_type != ZSTD_MANIFEST_TYPE_TOC:
        raise FormatError(f"corrupt zstd eStargz footer: manifest type {manifest_type}, not 1")
    limit = blob_size - ZSTD_FOOTER_SIZE
    if toc_offset < 8 or clen == 0 or toc_offset + clen > limit:
        raise FormatError(
            f"zstd footer points the TOC at [{toc_offset}, {toc_offset + clen}), outside the "
            f"blob (must lie in [8, {limit}] for a {blob_size}-byte blob)"
        )
    return Footer("zstd", ZSTD_FOOTER_SIZE, toc_offset, toc_offset + clen, ulen, toc_offset - 8, "zstd")


def encode_gzip_footer(toc_offset: int, *, legacy: bool = False) -> bytes:
    """The exact footer bytes Go's estargz writer emits (used by tests and benchmarks)."""
    field = b"%016x" % toc_offset + STARGZ_MAGIC
    if legacy:
        extra = field
    else:
        extra = b"SG" + struct.pack("<H", len(field)) + field
    header = _GZIP_ID + bytes([_FEXTRA]) + b"\x00" * 4 + b"\x00\xff"
    return header + struct.pack("<H", len(extra)) + extra + _EMPTY_DEFLATE_TAIL


def encode_zstd_footer(toc_offset: int, clen: int, ulen: int) -> bytes:
    """The 48-byte skippable frame ctr-remote --zstdchunked ends a blob with."""
    payload = struct.pack("<4Q", toc_offset, clen, ulen, ZSTD_MANIFEST_TYPE_TOC) + ZSTD_MAGIC
    return SKIPPABLE_FRAME_MAGIC + struct.pack("<I", len(payload)) + payload

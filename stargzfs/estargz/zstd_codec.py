"""zstd eStargz, stargz-snapshotter's `zstdchunked` (estargz.md §A6): zstd frames, a 48-byte
skippable-frame footer, and the bare TOC JSON in one frame wrapped in a skippable frame.

containers/storage's zstd:chunked v2 footer (`GNUlInUx`, a different manifest) is
recognised and refused rather than misread.
"""

from __future__ import annotations

import struct

import zstandard

from stargzfs.errors import FormatError, UnsupportedError
from stargzfs.estargz.codec import CappedStream, Codec, Footer

FOOTER_SIZE = 48
FOOTER_MAGIC = b"GnUlInUx"
V2_FOOTER_MAGIC = b"GNUlInUx"  # containers/storage >= 1.50: 64-byte payload + tar-split
SKIPPABLE_FRAME_MAGIC = b"\x50\x2a\x4d\x18"
SKIPPABLE_HEADER_SIZE = 8
MANIFEST_TYPE_TOC = 1
#: zstd has no output cap per call; 256 input bytes expand to at most ~8 MiB (ratio ~32768)
_INPUT_STEP = 256


class ZstdStream(CappedStream):
    name = "zstd"

    def _new_member(self) -> None:
        self._zstd = zstandard.ZstdDecompressor().decompressobj()

    def _step(self) -> None:
        piece = self._next_input(_INPUT_STEP)
        try:
            chunk = self._zstd.decompress(piece)
        except zstandard.ZstdError as exc:
            raise self._corrupt(exc) from None
        self._emit(chunk)
        if self._zstd.eof:
            self._member_finished(self._zstd.unused_data)


class ZstdCodec(Codec):
    name = "zstd"
    magic = b"\x28\xb5\x2f\xfd"
    footer_sizes = (FOOTER_SIZE,)
    stream = ZstdStream

    # ------------------------------------------------------------------ footer
    def parse_footer(self, tail: bytes, blob_size: int) -> Footer | None:
        if tail.endswith(V2_FOOTER_MAGIC):
            raise UnsupportedError(
                "blob has a containers/storage zstd:chunked v2 footer (GNUlInUx); "
                "only stargz-snapshotter's zstdchunked footer (GnUlInUx) is supported"
            )
        if not tail.endswith(FOOTER_MAGIC) or blob_size < FOOTER_SIZE:
            return None
        footer = tail[-FOOTER_SIZE:]
        if footer[:8] != SKIPPABLE_FRAME_MAGIC + struct.pack("<I", 40):
            raise FormatError(
                f"corrupt zstd eStargz footer: skippable frame header is {footer[:8].hex()}, "
                f"not {SKIPPABLE_FRAME_MAGIC.hex()}28000000"
            )
        toc_offset, clen, ulen, manifest_type = struct.unpack("<4Q", footer[8:40])
        if manifest_type != MANIFEST_TYPE_TOC:
            raise FormatError(f"corrupt zstd eStargz footer: manifest type {manifest_type}, not 1")
        limit = blob_size - FOOTER_SIZE
        if toc_offset < SKIPPABLE_HEADER_SIZE or clen == 0 or toc_offset + clen > limit:
            raise FormatError(
                f"zstd footer points the TOC at [{toc_offset}, {toc_offset + clen}), outside the "
                f"blob (must lie in [8, {limit}] for a {blob_size}-byte blob)"
            )
        payload_end = toc_offset - SKIPPABLE_HEADER_SIZE
        return Footer("zstd", FOOTER_SIZE, toc_offset, toc_offset + clen, ulen, payload_end, "zstd")

    # ------------------------------------------------------------------ TOC member
    def toc_member_start(self, footer: Footer) -> int:
        return footer.toc_offset - SKIPPABLE_HEADER_SIZE  # the wrapper header is checked too

    def read_toc(self, member: memoryview, footer: Footer, max_toc_size: int) -> bytes:
        """A skippable frame header, then one zstd frame holding the bare JSON."""
        header = bytes(member[:SKIPPABLE_HEADER_SIZE])
        expected_header = SKIPPABLE_FRAME_MAGIC + footer.toc_compressed_size.to_bytes(4, "little")
        where = f"zstd TOC frame at offset {footer.toc_offset}"
        if header != expected_header:
            raise FormatError(
                f"zstd TOC at offset {footer.toc_offset} is not wrapped in a skippable frame of "
                f"{footer.toc_compressed_size} bytes (found {header.hex()})"
            )
        declared = footer.toc_uncompressed_size or 0  # fetch_toc already refused one over the cap
        try:
            raw = self.first_member(member[SKIPPABLE_HEADER_SIZE:], min(max_toc_size, declared))
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        if len(raw) != declared:
            raise FormatError(f"{where} decodes to {len(raw)} bytes, the footer says {declared}")
        return raw

    # ------------------------------------------------------------------ writing
    def compress(self, data: bytes, level: int | None = None) -> bytes:
        return zstandard.ZstdCompressor(level=3 if level is None else level).compress(data)

    def encode_toc_and_footer(self, toc_json: bytes, toc_offset: int, *, legacy: bool = False) -> bytes:
        frame = self.compress(toc_json)
        header = SKIPPABLE_FRAME_MAGIC + len(frame).to_bytes(4, "little")
        return header + frame + encode_footer(toc_offset + len(header), len(frame), len(toc_json))


def encode_footer(toc_offset: int, clen: int, ulen: int) -> bytes:
    """The 48-byte skippable frame ctr-remote --zstdchunked ends a blob with."""
    payload = struct.pack("<4Q", toc_offset, clen, ulen, MANIFEST_TYPE_TOC) + FOOTER_MAGIC
    return SKIPPABLE_FRAME_MAGIC + struct.pack("<I", len(payload)) + payload


ZSTD = ZstdCodec()

"""eStargz footers: tell an eStargz blob from a plain layer and locate its TOC.

Each codec knows its own footers (gzip_codec: 51 and 47 bytes, plus the refused 46-byte
external-TOC form; zstd_codec: the 48-byte skippable frame); this module asks them in turn.
"""

from __future__ import annotations

from stargzfs.errors import NotEstargzError
from stargzfs.estargz.codec import Footer
from stargzfs.estargz.codecs import CODECS

MAX_FOOTER_SIZE = max(size for codec in CODECS for size in codec.footer_sizes)
MIN_FOOTER_SIZE = min(size for codec in CODECS for size in codec.footer_sizes)

__all__ = ["MAX_FOOTER_SIZE", "MIN_FOOTER_SIZE", "Footer", "parse_footer"]


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
    for codec in CODECS:
        footer = codec.parse_footer(tail, blob_size)
        if footer is not None:
            return footer
    raise NotEstargzError("not eStargz: the blob ends without an eStargz footer (plain layer)")

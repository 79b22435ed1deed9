"""Every eStargz compression stargzfs knows, and how to pick one by name or by its bytes."""

from __future__ import annotations

from stargzfs.errors import FormatError
from stargzfs.estargz.codec import Codec
from stargzfs.estargz.gzip_codec import GZIP
from stargzfs.estargz.zstd_codec import ZSTD

#: In footer-detection order: the zstd footer's magic is checked before gzip's STARGZ marker.
CODECS: tuple[Codec, ...] = (ZSTD, GZIP)
CODEC_NAMES: tuple[str, ...] = tuple(sorted(codec.name for codec in CODECS))
_BY_NAME = {codec.name: codec for codec in CODECS}


def codec_named(name: str) -> Codec:
    """The codec called `name` ("gzip", "zstd"); FormatError for anything else."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise FormatError(
            f"unknown eStargz compression {str(name)[:40]!r} (expected {' or '.join(CODEC_NAMES)})"
        ) from None


def codec_for_data(data: bytes | memoryview) -> Codec:
    """The codec whose members start like `data` does (chunk data whose compression is unknown)."""
    head = bytes(data[:4])
    for codec in CODECS:
        if head.startswith(codec.magic):
            return codec
    raise FormatError(f"chunk data starts with {head.hex()}: neither a gzip member nor a zstd frame")

"""One member/frame at a time, with a hard output cap (zip-bomb defence) for gzip and zstd."""

from __future__ import annotations

import gzip
import zlib

import pytest
import zstandard

from stargzfs.errors import FormatError
from stargzfs.estargz.decompress import decompressor_for

MiB = 1024 * 1024


def gzip_member(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def zstd_frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=False).compress(data)


def bomb(compress_chunk, finish, total: int) -> bytes:
    """A member of `total` spaces, compressed incrementally (never all in memory)."""
    block = b" " * MiB
    return b"".join(compress_chunk(block) for _ in range(total // MiB)) + finish()


def gzip_bomb(total: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return bomb(compressor.compress, compressor.flush, total)


def zstd_bomb(total: int) -> bytes:
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
    return bomb(compressor.compress, compressor.flush, total)


ENCODERS = {"gzip": gzip_member, "zstd": zstd_frame}


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_first_member_stops_at_the_member_boundary(compression: str) -> None:
    encode = ENCODERS[compression]
    data = encode(b"first member") + encode(b"second member")
    assert decompressor_for(compression).first_member(data, limit=1000) == b"first member"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_multi_member_stream_continues_across_members(compression: str) -> None:
    encode = ENCODERS[compression]
    data = encode(b"abc" * 1000) + encode(b"") + encode(b"def" * 1000)
    stream = decompressor_for(compression).open_stream(data, multi_member=True)
    assert stream.read(2999) == b"abc" * 999 + b"ab"
    assert stream.read(4) == b"cdef"
    assert stream.read() == b"def" * 999
    assert stream.read() == b""


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_multi_member_read_to_the_end(compression: str) -> None:
    encode = ENCODERS[compression]
    data = encode(b"abc" * 1000) + encode(b"") + encode(b"def" * 1000)
    stream = decompressor_for(compression).open_stream(data, multi_member=True)
    assert stream.read() == b"abc" * 1000 + b"def" * 1000
    assert stream.read(10) == b""


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_exact_limit_is_allowed_one_byte_more_is_not(compression: str) -> None:
    data = ENCODERS[compression](b"j" * 4096)
    decoder = decompressor_for(compression)
    assert len(decoder.first_member(data, limit=4096)) == 4096
    with pytest.raises(FormatError, match="past the 4095-byte limit"):
        decoder.first_member(data, limit=4095)


@pytest.mark.parametrize(
    ("compression", "make_bomb", "step"),
    [("gzip", gzip_bomb, 1 * MiB), ("zstd", zstd_bomb, 8 * MiB)],
)
def test_bomb_fails_after_decoding_at_most_limit_plus_one_step(compression, make_bomb, step) -> None:
    data = make_bomb(64 * MiB)
    assert len(data) < MiB // 8  # a tiny download that would expand to 64 MiB
    stream = decompressor_for(compression).open_stream(data, limit=4 * MiB)
    with pytest.raises(FormatError, match="past the 4194304-byte limit"):
        stream.read()
    assert 4 * MiB < stream.produced <= 4 * MiB + step


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_truncated_member_is_a_format_error(compression: str) -> None:
    data = ENCODERS[compression](bytes(range(256)) * 400)
    with pytest.raises(FormatError, match="truncated"):
        decompressor_for(compression).first_member(data[: len(data) // 2], limit=MiB)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_empty_input_is_truncated(compression: str) -> None:
    with pytest.raises(FormatError, match="truncated"):
        decompressor_for(compression).first_member(b"", limit=MiB)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_garbage_is_a_format_error(compression: str) -> None:
    with pytest.raises(FormatError, match=f"{compression} data is corrupt"):
        decompressor_for(compression).first_member(b"this is not compressed at all" * 10, limit=MiB)


def test_gzip_member_with_fextra_header_is_accepted() -> None:
    """The TOC member of old stargz blobs carries FEXTRA (`stargz.toc`)."""
    body = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = body.compress(b"toc bytes") + body.flush()
    extra = b"stargz.toc"
    header = bytes.fromhex("1f8b08040000000000ff") + len(extra).to_bytes(2, "little") + extra
    trailer = zlib.crc32(b"toc bytes").to_bytes(4, "little") + (9).to_bytes(4, "little")
    assert decompressor_for("gzip").first_member(header + deflated + trailer, limit=100) == b"toc bytes"


def test_unknown_compression_names_the_value() -> None:
    with pytest.raises(FormatError, match="'lz4'"):
        decompressor_for("lz4")

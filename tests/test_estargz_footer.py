"""Footer detection: the three eStargz footers, plain layers, and every way a footer can lie."""

from __future__ import annotations

import gzip
import struct

import pytest

from stargzfs.errors import FormatError, NotEstargzError, UnsupportedError
from stargzfs.estargz.footer import MAX_FOOTER_SIZE, parse_footer
from stargzfs.estargz.gzip_codec import encode_footer as encode_gzip_footer
from stargzfs.estargz.zstd_codec import encode_footer as encode_zstd_footer
from support.paths import NYDUS_FIXTURES

PAYLOAD = gzip.compress(b"x" * 5000, mtime=0)


def parse_blob(blob: bytes):
    return parse_footer(blob[-MAX_FOOTER_SIZE:], len(blob))


def test_estargz_footer_bytes_match_the_spec_table() -> None:
    footer = encode_gzip_footer(0xA6810C)
    assert len(footer) == 51
    assert footer[:16] == bytes.fromhex("1f8b08040000000000ff" "1a00" "5347" "1600")
    assert footer[16:38] == b"0000000000a6810cSTARGZ"
    assert footer[38:] == bytes.fromhex("010000ffff") + b"\0" * 8


def test_estargz_51_byte_footer() -> None:
    blob = PAYLOAD + b"T" * 100 + encode_gzip_footer(len(PAYLOAD))
    footer = parse_blob(blob)
    assert (footer.kind, footer.size, footer.compression) == ("estargz", 51, "gzip")
    assert footer.toc_offset == footer.payload_end == len(PAYLOAD)
    assert footer.toc_end == len(blob) - 51
    assert footer.toc_uncompressed_size is None


def test_legacy_47_byte_footer() -> None:
    blob = PAYLOAD + b"T" * 100 + encode_gzip_footer(len(PAYLOAD), legacy=True)
    footer = parse_blob(blob)
    assert (footer.kind, footer.size) == ("legacy", 47)
    assert footer.toc_offset == len(PAYLOAD)
    assert footer.toc_end == len(blob) - 47


@pytest.mark.parametrize(
    ("name", "toc_offset"),
    [
        ("e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5", 0x731F),
        ("5aabe268d8139e952bfff14b2dd0f43fcfef4f2c38b63ea782486ce7268d4954", 0x3B55),
    ],
)
def test_nydus_fixture_blobs_end_with_a_legacy_footer(name: str, toc_offset: int) -> None:
    blob = (NYDUS_FIXTURES / "blobs" / name).read_bytes()
    footer = parse_blob(blob)
    assert (footer.kind, footer.toc_offset, footer.toc_end) == ("legacy", toc_offset, len(blob) - 47)


def test_footer_header_fields_other_writers_vary_are_not_checked() -> None:
    footer = bytearray(encode_gzip_footer(10))
    footer[4:8] = b"\x12\x34\x56\x78"  # MTIME
    footer[8] = 2  # XFL
    footer[9] = 3  # OS = Unix
    footer[16:32] = b"000000000000000A"  # Go's ParseInt accepts upper case
    assert parse_blob(PAYLOAD + bytes(footer)).toc_offset == 10


def test_zstd_footer() -> None:
    blob = b"\0" * 100 + b"\x50\x2a\x4d\x18\x20\0\0\0" + b"Z" * 32 + encode_zstd_footer(108, 32, 999)
    footer = parse_blob(blob)
    assert (footer.kind, footer.size, footer.compression) == ("zstd", 48, "zstd")
    assert (footer.toc_offset, footer.toc_end, footer.toc_uncompressed_size) == (108, 140, 999)
    assert footer.payload_end == 100
    assert footer.toc_end == len(blob) - 48


def test_plain_gzip_layer_is_not_estargz() -> None:
    with pytest.raises(NotEstargzError, match="plain layer"):
        parse_blob(gzip.compress(b"plain tar" * 1000))


@pytest.mark.parametrize("size", [0, 1, 20, 45])
def test_tiny_blobs_are_not_estargz(size: int) -> None:
    blob = encode_gzip_footer(1, legacy=True)[-size:] if size else b""
    with pytest.raises(NotEstargzError, match=f"only {size} bytes"):
        parse_footer(blob, size)


def test_blob_exactly_a_legacy_footer_has_no_room_for_a_toc() -> None:
    with pytest.raises(FormatError, match="outside the blob"):
        parse_blob(encode_gzip_footer(0, legacy=True))


def test_external_toc_footer_is_unsupported() -> None:
    extra = b"SG" + struct.pack("<H", 17) + b"STARGZEXTERNALTOC"
    footer = bytes.fromhex("1f8b08040000000000ff") + struct.pack("<H", len(extra)) + extra
    footer += bytes.fromhex("010000ffff") + b"\0" * 8
    assert len(footer) == 46
    with pytest.raises(UnsupportedError, match="external-TOC"):
        parse_blob(PAYLOAD + footer)


def test_containers_storage_v2_zstd_footer_is_unsupported() -> None:
    with pytest.raises(UnsupportedError, match="GNUlInUx"):
        parse_blob(b"\0" * 200 + b"GNUlInUx")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f[:16] + b"00000000zz00000a" + f[32:], "not 16 hex digits"),
        (lambda f: f[:16] + b"-000000000000001" + f[32:], "not 16 hex digits"),
        (lambda f: b"\x1f\x8c" + f[2:], "gzip magic"),
        (lambda f: f[:10] + b"\x1b\x00" + f[12:], "XLEN is 27"),
        (lambda f: f[:3] + b"\x0c" + f[4:], "flags 0x0c"),
        (lambda f: f[:12] + b"XG" + f[14:], "subfield is not SG"),
        (lambda f: f[:-1] + b"\x01", "empty stored deflate"),
    ],
)
def test_corrupt_estargz_footer_is_a_format_error(mutate, message: str) -> None:
    footer = mutate(encode_gzip_footer(100))
    with pytest.raises(FormatError, match=message):
        parse_blob(PAYLOAD + footer)


@pytest.mark.parametrize("legacy", [False, True])
def test_toc_offset_past_the_blob_is_rejected(legacy: bool) -> None:
    blob = PAYLOAD + encode_gzip_footer(len(PAYLOAD) + 10_000_000, legacy=legacy)
    with pytest.raises(FormatError, match="outside the blob"):
        parse_blob(blob)


def test_toc_offset_at_the_footer_itself_is_rejected() -> None:
    blob = PAYLOAD + encode_gzip_footer(len(PAYLOAD))
    with pytest.raises(FormatError, match="outside the blob"):
        parse_blob(blob)


def test_toc_offset_zero_is_rejected_like_upstream() -> None:
    with pytest.raises(FormatError, match="offset 0"):
        parse_blob(PAYLOAD + encode_gzip_footer(0))


@pytest.mark.parametrize(
    ("footer", "message"),
    [
        (b"\x50\x2a\x4d\x18\x30\0\0\0" + encode_zstd_footer(8, 10, 10)[8:], "skippable frame header"),
        (encode_zstd_footer(8, 10, 10)[:32] + struct.pack("<Q", 2) + b"GnUlInUx", "manifest type 2"),
        (encode_zstd_footer(4, 10, 10), "outside the blob"),
        (encode_zstd_footer(8, 0, 10), "outside the blob"),
        (encode_zstd_footer(8, 10**9, 10), "outside the blob"),
        (encode_zstd_footer(2**63, 2**63, 10), "outside the blob"),
    ],
)
def test_corrupt_zstd_footer_is_a_format_error(footer: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_blob(b"\0" * 100 + footer)


def test_tail_longer_than_the_blob_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        parse_footer(b"\0" * 60, 50)

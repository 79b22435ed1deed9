"""blob.meta v1 bit packing (rafs-v6 spec §3.1): exact bytes, round trips, corrupt files."""

from __future__ import annotations

import struct

import pytest

from stargzfs.errors import FormatError
from stargzfs.rafs.blobmeta import (
    BLOB_META_MAGIC,
    BlobMetaHeader,
    ChunkMeta,
    blob_meta_header_for,
    decode_blob_meta,
    encode_blob_meta,
)

FOUR_MIB = 4 << 20
SIXTEEN_MIB = 16 << 20


def test_header_matches_v2_1_layout() -> None:
    data = encode_blob_meta([ChunkMeta(0, 12, 13802, 0), ChunkMeta(4096, 16, 14332, 0)])
    assert len(data) == 8192
    header = data[4096:]
    assert struct.unpack_from("<IIIIQQQ", header) == (BLOB_META_MAGIC, 1, 0, 2, 0, 32, 32)
    assert header[40:4092] == bytes(4052)
    assert struct.unpack_from("<I", header, 4092) == (BLOB_META_MAGIC,)
    assert data[32:4096] == bytes(4096 - 32)


def test_chunk_words_bit_layout() -> None:
    """uoff in bits 12-43, (usize-1) split 44-63 / 8-11; coff in 0-39, unknown csize = all ones."""
    usize = FOUR_MIB + 0x12345  # needs the high (size-1) nibble
    data = encode_blob_meta([ChunkMeta(0x7654_3000, usize, 0x12_3456_789A, 0)])
    word0, word1 = struct.unpack_from("<QQ", data)
    size_minus_one = usize - 1
    assert word0 == 0x7654_3000 | ((size_minus_one & 0xFFFFF) << 44) | ((size_minus_one >> 20) << 8)
    assert word0 & 0xFF == 0
    assert word1 == 0x12_3456_789A | (0xFFFFFF << 40)


def test_known_compressed_size_is_packed_like_uncompressed() -> None:
    data = encode_blob_meta([ChunkMeta(0, 100, 5, 0x123456)])
    (word1,) = struct.unpack_from("<Q", data, 8)
    csize_minus_one = 0x123456 - 1
    assert word1 >> 44 == csize_minus_one & 0xFFFFF
    assert (word1 >> 40) & 0xF == csize_minus_one >> 20


@pytest.mark.parametrize("count", [0, 1, 255, 256, 257, 1000])
def test_round_trip_sizes(count: int) -> None:
    chunks = [ChunkMeta(i * FOUR_MIB, (i % 7) * 1000 + 1, 247 + i * 4109, 0) for i in range(count)]
    data = encode_blob_meta(chunks)
    expected_array = (16 * count + 4095) // 4096 * 4096
    assert len(data) == expected_array + 4096
    header, decoded = decode_blob_meta(data)
    assert header == blob_meta_header_for(count)
    assert [(c.uncompressed_offset, c.uncompressed_size, c.compressed_offset) for c in decoded] == [
        (c.uncompressed_offset, c.uncompressed_size, c.compressed_offset) for c in chunks
    ]
    assert all(c.compressed_size == SIXTEEN_MIB for c in decoded)  # v2.1's wrapped 0-1


def test_extremes_round_trip() -> None:
    chunks = [
        ChunkMeta(0, 1, 0, 1),
        ChunkMeta(4096, SIXTEEN_MIB, (1 << 40) - 1, SIXTEEN_MIB),
        ChunkMeta((1 << 44) - 4096, FOUR_MIB, 1, 77),
    ]
    assert decode_blob_meta(encode_blob_meta(chunks))[1] == chunks


def test_header_for() -> None:
    assert blob_meta_header_for(28) == BlobMetaHeader(BLOB_META_MAGIC, 1, 0, 28, 0, 448, 448)
    with pytest.raises(FormatError, match="limit"):
        blob_meta_header_for(0x100000)


@pytest.mark.parametrize(
    "chunk, message",
    [
        (ChunkMeta(100, 10, 0, 0), "4 KiB aligned"),
        (ChunkMeta(1 << 44, 10, 0, 0), "4 KiB aligned"),
        (ChunkMeta(0, 0, 0, 0), "uncompressed size 0"),
        (ChunkMeta(0, SIXTEEN_MIB + 1, 0, 0), "uncompressed size"),
        (ChunkMeta(0, 10, 1 << 40, 0), "40 bits"),
        (ChunkMeta(0, 10, 0, SIXTEEN_MIB + 1), "compressed size"),
    ],
)
def test_encode_rejects_unrepresentable_chunks(chunk: ChunkMeta, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        encode_blob_meta([chunk])


def _valid() -> bytearray:
    return bytearray(encode_blob_meta([ChunkMeta(0, 10, 0, 0), ChunkMeta(4096, 10, 50, 0)]))


def _corrupt(offset_from_end: int, value: int) -> bytes:
    data = _valid()
    struct.pack_into("<I", data, len(data) - offset_from_end, value)
    return bytes(data)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "size 0"),
        (bytes(_valid())[:-1], "multiple of 4096"),
        (bytes(_valid())[4096:], "need a 8192-byte file"),  # array cut off
        (bytes(4096), "bad magic"),
        (_corrupt(4096, 0xDEADBEEF), "bad magic"),  # magic
        (_corrupt(4, 0), "bad magic"),  # magic2
        (_corrupt(4096 - 8, 1), "compressed chunk-info"),  # ci_compressor
        (_corrupt(4096 - 12, 3), "do not match 3 entries"),  # ci_entries
        (_corrupt(4096 - 24, 48), "do not match"),  # ci_compressed_size
        (_corrupt(4096 - 16, 4096), "at offset 4096"),  # ci_offset
        (bytes(4096) + bytes(_valid()), "need a 8192-byte file"),  # extra leading page
    ],
)
def test_decode_rejects_corrupt_files(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message) as info:
        decode_blob_meta(data)
    assert str(info.value).startswith("blob.meta:")
    assert "\n" not in str(info.value)

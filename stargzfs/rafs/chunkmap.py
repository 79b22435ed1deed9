"""nydusd's `<blob_id>.chunk_map`: which chunks of a blobcache file are present (blobcache.md).

`[4096-byte header][bitmap, chunk i = bit 1 << (7 - i % 8) of byte i // 8]`, MSB first. A set
bit means the chunk's bytes in `<blob_id>` are complete; nydusd sets bits only after writing
the data and never clears them, and so does stargzfs, so nydusd can take over a cache the
mount filled (and the other way round).
"""

from __future__ import annotations

import struct

from stargzfs.errors import FormatError

MAGIC = 0x424D4150
MAGIC2 = 0x434D4150
ALL_READY = 0x4D4D4150
VERSION = 1
HEADER_SIZE = 4096
_HEADER = struct.Struct("<IIII")


def file_size(chunk_count: int) -> int:
    """nydusd rejects a chunk_map of any other size as corrupt."""
    return HEADER_SIZE + (chunk_count + 7) // 8


def empty(chunk_count: int) -> bytes:
    """A new map: the header, no chunk present."""
    header = _HEADER.pack(MAGIC, VERSION, MAGIC2, ALL_READY if chunk_count == 0 else 0)
    return header + bytes(file_size(chunk_count) - len(header))


def bit(index: int) -> tuple[int, int]:
    """(file offset of the byte, mask) of chunk `index`."""
    return HEADER_SIZE + (index >> 3), 1 << (7 - (index & 7))


def decode(data: bytes, chunk_count: int) -> bytearray:
    """The bitmap of a chunk_map file (a new, all-zero file reads as empty, as in nydusd)."""
    if len(data) != file_size(chunk_count):
        raise FormatError(f"chunk_map is {len(data)} bytes; {chunk_count} chunks need {file_size(chunk_count)}")
    if not any(data[:HEADER_SIZE]):
        return bytearray(len(data) - HEADER_SIZE)
    magic, version, magic2, _ = _HEADER.unpack_from(data)
    if magic != MAGIC or (version >= 1 and magic2 != MAGIC2):
        raise FormatError(f"chunk_map has magic {magic:#010x}/{magic2:#010x}, not {MAGIC:#010x}/{MAGIC2:#010x}")
    return bytearray(data[HEADER_SIZE:])


def is_set(bitmap: bytes | bytearray, index: int) -> bool:
    return bool(bitmap[index >> 3] & (1 << (7 - (index & 7))))


def count(bitmap: bytes | bytearray, chunk_count: int) -> int:
    """Chunks present (bits past `chunk_count` in the last byte are ignored)."""
    whole, rest = divmod(chunk_count, 8)
    present = int.from_bytes(bitmap[:whole], "big").bit_count()
    if rest:
        present += (bitmap[whole] >> (8 - rest)).bit_count()
    return present


def all_ready_header() -> bytes:
    return _HEADER.pack(MAGIC, VERSION, MAGIC2, ALL_READY)

"""Byte layouts of rafs-v6 §2: sizes, field offsets and pack/unpack round trips."""

from __future__ import annotations

import struct

from stargzfs.rafs.ondisk import (
    BlobEntry,
    ChunkIndex,
    ChunkRecord,
    DeviceSlot,
    Dirent,
    ExtSuperBlock,
    Inode,
    SuperBlock,
    chunk_format,
    i_format,
    new_decode_dev,
    new_encode_dev,
    split_xattr_name,
    xattr_entry_size,
    xattr_icount,
    xattr_size_from_icount,
)


def test_superblock_field_offsets() -> None:
    sb = SuperBlock(inos=19, blocks=5, meta_blkaddr=2, extra_devices=1)
    raw = bytes(1024) + sb.pack()
    assert len(sb.pack()) == 128
    assert struct.unpack_from("<I", raw, 1024)[0] == 0xE0F5E1E2
    assert raw[1024 + 12] == 12 and struct.unpack_from("<H", raw, 1024 + 14)[0] == 128
    assert struct.unpack_from("<I", raw, 1024 + 40)[0] == 2
    assert struct.unpack_from("<I", raw, 1024 + 80)[0] == 0x0C
    assert struct.unpack_from("<HH", raw, 1024 + 86) == (1, 11)
    assert SuperBlock.unpack(raw) == sb


def test_ext_superblock_and_tables_round_trip() -> None:
    ext = ExtSuperBlock(flags=0x48, blob_table_offset=4096, blob_table_size=256, chunk_size=0x400000,
                        chunk_table_offset=16384, chunk_table_size=160)
    raw = bytes(1152) + ext.pack()
    assert len(ext.pack()) == 256 and struct.unpack_from("<I", raw, 1152 + 20)[0] == 0x400000
    assert ExtSuperBlock.unpack(raw) == ext
    slot = DeviceSlot(b"a" * 64, 7)
    assert len(slot.pack()) == 128 and DeviceSlot.unpack(slot.pack(), 0) == slot
    blob = BlobEntry(b"b" * 64, 0, 0x400000, 28, 2, 1, 1, 0, 27291660, 0, 0, 0, 448, 448)
    packed = blob.pack()
    assert len(packed) == 256 and struct.unpack_from("<Q", packed, 120)[0] == 448
    assert BlobEntry.unpack(packed, 0) == blob
    record = ChunkRecord(b"\x01" * 32, 0, 1, 0, 4096, 247, 8192, 0, 27)
    assert len(record.pack()) == 80 and ChunkRecord.unpack(record.pack(), 0) == record
    assert struct.unpack_from("<I", record.pack(), 72)[0] == 27


def test_inodes_both_forms() -> None:
    ext = Inode(True, i_format(True, 4), 0, 0o100644, 1, 13631488, 0x2A, 5, 1, 2, 1600000000, 7)
    assert len(ext.pack()) == 64 and ext.format == 0x09
    assert Inode.unpack(ext.pack(), 0) == ext
    compact = Inode(False, i_format(False, 2), 0, 0o40755, 2, 40, 3, 9, 0, 0, 0, 0)
    assert len(compact.pack()) == 32
    assert Inode.unpack(compact.pack(), 0) == compact


def test_chunk_index_device_and_high_bits() -> None:
    index = ChunkIndex(chunk_index=0x12345, device_id=1, blkaddr=77)
    raw = index.pack()
    assert struct.unpack("<HHI", raw) == (0x2345, 0x0101, 77)
    assert ChunkIndex.unpack(raw, 0) == index
    assert chunk_format(0x400000) == 0x2A and chunk_format(0x100000) == 0x28


def test_dirent_xattr_and_dev_helpers() -> None:
    assert Dirent.unpack(Dirent(128, 36, 2).pack(), 0) == Dirent(128, 36, 2)
    assert split_xattr_name(b"user.key") == (1, b"key")
    assert split_xattr_name(b"security.capability") == (6, b"capability")
    assert split_xattr_name(b"system.posix_acl_access") == (2, b"")
    assert split_xattr_name(b"system.other") is None and split_xattr_name(b"user.") is None
    assert xattr_entry_size(3, 9) == 16
    assert xattr_icount(12 + 32) == 9 and xattr_size_from_icount(9) == 44 and xattr_icount(0) == 0
    assert new_decode_dev(new_encode_dev(7, 300)) == (7, 300)
    assert new_encode_dev(1, 3) == 0x103

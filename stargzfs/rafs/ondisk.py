"""Every RAFS v6 on-disk structure's byte layout, in one place (like erofs-utils' erofs_fs.h).

Spec: rafs-v6.md §2. All integers little-endian. Each structure is a frozen msgspec Struct with
`pack() -> bytes` and `unpack(buf, offset) -> instance`; the bulk writer uses the
precompiled `struct.Struct` objects directly (`pack_into`) to stay fast on 1M inodes.
"""

from __future__ import annotations

import struct

import msgspec

from stargzfs.errors import FormatError

BLOCK_SIZE = 4096
BLOCK_BITS = 12

# --- EROFS superblock (§2.2) -------------------------------------------------------------
SUPERBLOCK_OFFSET = 1024
EROFS_MAGIC = 0xE0F5E1E2
FEATURE_COMPAT_RAFS_V6 = 0x40000000
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8
NYDUS_FEATURE_INCOMPAT = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE
ROOT_NID = 128
DEVT_SLOT_OFFSET = 1408
DEVT_SLOTOFF = DEVT_SLOT_OFFSET // 128

SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHH38s")
assert SUPERBLOCK.size == 128

# --- RAFS v6 extended superblock (§2.3) --------------------------------------------------
EXT_SUPERBLOCK_OFFSET = 1152
EXT_SUPERBLOCK = struct.Struct("<QQIIQQQII200s")
assert EXT_SUPERBLOCK.size == 256

FLAG_COMPRESS_NONE = 0x1
FLAG_COMPRESS_LZ4_BLOCK = 0x2
FLAG_DIGESTER_BLAKE3 = 0x4
FLAG_DIGESTER_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESS_GZIP = 0x40
FLAG_COMPRESS_ZSTD = 0x80
COMPRESSOR_FLAGS = {
    "none": FLAG_COMPRESS_NONE,
    "lz4_block": FLAG_COMPRESS_LZ4_BLOCK,
    "gzip": FLAG_COMPRESS_GZIP,
    "zstd": FLAG_COMPRESS_ZSTD,
}
DIGESTER_FLAGS = {"blake3": FLAG_DIGESTER_BLAKE3, "sha256": FLAG_DIGESTER_SHA256}
#: Blob-table algorithm numbers (RafsV6Blob compression_algo / digest_algo).
COMPRESSOR_ALGOS = {"none": 0, "lz4_block": 1, "gzip": 2, "zstd": 3}
DIGESTER_ALGOS = {"blake3": 0, "sha256": 1}

# --- device slot (§2.4) and blob table entry (§2.5) --------------------------------------
DEVICE_SLOT = struct.Struct("<64sII56s")
assert DEVICE_SLOT.size == 128
BLOB_ENTRY = struct.Struct("<64sIIIIIIQQIIQQQ32s88s")
assert BLOB_ENTRY.size == 256
BLOB_ID_LEN = 64
BLOB_FEATURE_ALIGNED = 0x1
MAX_CHUNK_COUNT = 1 << 24

# --- inodes (§2.6) -----------------------------------------------------------------------
INODE_EXTENDED = struct.Struct("<HHHHQIIIIQII16s")
assert INODE_EXTENDED.size == 64
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
assert INODE_COMPACT.size == 32
LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4
FORMAT_EXTENDED_BIT = 1
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_FORMAT_BLKBITS_MASK = 0x1F


def i_format(extended: bool, layout: int) -> int:
    return (1 if extended else 0) | (layout << 1)


def chunk_format(chunk_size: int) -> int:
    """i_u of chunk-based files: 0x20 (indexes) | log2(chunk_size) - 12 (0x2A for 4 MiB)."""
    return CHUNK_FORMAT_INDEXES | (chunk_size.bit_length() - 1 - BLOCK_BITS)


# --- dirents (§2.8) ----------------------------------------------------------------------
DIRENT = struct.Struct("<QHBB")
assert DIRENT.size == 12
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
#: stat.S_IFMT(mode) >> 12 → erofs file type.
FILE_TYPE_BY_IFMT = {0o01: FT_FIFO, 0o02: FT_CHR, 0o04: FT_DIR, 0o06: FT_BLK, 0o10: FT_REG, 0o12: FT_SYMLINK, 0o14: FT_SOCK}

# --- xattrs (§2.9) -----------------------------------------------------------------------
XATTR_IBODY_HEADER = struct.Struct("<IB7s")
assert XATTR_IBODY_HEADER.size == 12
XATTR_ENTRY = struct.Struct("<BBH")
assert XATTR_ENTRY.size == 4
#: name_index → prefix. Indexes 2/3 are whole names (empty suffix).
XATTR_PREFIXES = {
    1: b"user.",
    2: b"system.posix_acl_access",
    3: b"system.posix_acl_default",
    4: b"trusted.",
    6: b"security.",
}
XATTR_EXACT_NAMES = {b"system.posix_acl_access": 2, b"system.posix_acl_default": 3}
XATTR_PREFIX_NAMES = ((b"user.", 1), (b"trusted.", 4), (b"security.", 6))


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """(name_index, suffix) for a storable name, else None (v2.1 panics on other names)."""
    exact = XATTR_EXACT_NAMES.get(name)
    if exact is not None:
        return exact, b""
    for prefix, index in XATTR_PREFIX_NAMES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    return None


def xattr_entry_size(suffix_len: int, value_len: int) -> int:
    return (XATTR_ENTRY.size + suffix_len + value_len + 3) & ~3


def xattr_icount(xattr_size: int) -> int:
    return 0 if xattr_size == 0 else (xattr_size - XATTR_IBODY_HEADER.size) // 4 + 1


def xattr_size_from_icount(icount: int) -> int:
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + (icount - 1) * 4


# --- chunk index (in the inode) and chunk table record (§2.7) ----------------------------
CHUNK_INDEX = struct.Struct("<HHI")
assert CHUNK_INDEX.size == 8
CHUNK_RECORD = struct.Struct("<32sIIIIQQQII")
assert CHUNK_RECORD.size == 80
CHUNK_FLAG_COMPRESSED = 0x1


def new_encode_dev(major: int, minor: int) -> int:
    """Linux new_encode_dev: the rdev encoding EROFS stores in i_u."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def new_decode_dev(dev: int) -> tuple[int, int]:
    return (dev & 0xFFF00) >> 8, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def _need(buf: bytes, offset: int, size: int, what: str) -> None:
    if offset < 0 or offset + size > len(buf):
        raise FormatError(f"{what} at offset {offset} lies beyond the end of the data ({len(buf)} bytes)")


class SuperBlock(msgspec.Struct, frozen=True):
    magic: int = EROFS_MAGIC
    checksum: int = 0
    feature_compat: int = FEATURE_COMPAT_RAFS_V6
    blkszbits: int = BLOCK_BITS
    extslots: int = 0
    root_nid: int = ROOT_NID
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = bytes(16)
    volume_name: bytes = bytes(16)
    feature_incompat: int = NYDUS_FEATURE_INCOMPAT
    u1: int = 0
    extra_devices: int = 0
    devt_slotoff: int = DEVT_SLOTOFF

    def pack(self) -> bytes:
        return SUPERBLOCK.pack(
            self.magic, self.checksum, self.feature_compat, self.blkszbits, self.extslots,
            self.root_nid, self.inos, self.build_time, self.build_time_nsec, self.blocks,
            self.meta_blkaddr, self.xattr_blkaddr, self.uuid, self.volume_name,
            self.feature_incompat, self.u1, self.extra_devices, self.devt_slotoff, bytes(38),
        )

    @classmethod
    def unpack(cls, buf: bytes, offset: int = SUPERBLOCK_OFFSET) -> SuperBlock:
        _need(buf, offset, SUPERBLOCK.size, "EROFS superblock")
        fields = SUPERBLOCK.unpack_from(buf, offset)
        return cls(*fields[:18])


class ExtSuperBlock(msgspec.Struct, frozen=True):
    flags: int = 0
    blob_table_offset: int = 0
    blob_table_size: int = 0
    chunk_size: int = 0
    chunk_table_offset: int = 0
    chunk_table_size: int = 0
    prefetch_table_offset: int = 0
    prefetch_table_size: int = 0

    def pack(self) -> bytes:
        return EXT_SUPERBLOCK.pack(
            self.flags, self.blob_table_offset, self.blob_table_size, self.chunk_size,
            self.chunk_table_offset, self.chunk_table_size, self.prefetch_table_offset,
            self.prefetch_table_size, 0, bytes(200),
        )

    @classmethod
    def unpack(cls, buf: bytes, offset: int = EXT_SUPERBLOCK_OFFSET) -> ExtSuperBlock:
        _need(buf, offset, EXT_SUPERBLOCK.size, "RAFS v6 extended superblock")
        fields = EXT_SUPERBLOCK.unpack_from(buf, offset)
        return cls(*fields[:8])


class DeviceSlot(msgspec.Struct, frozen=True):
    tag: bytes
    blocks: int
    mapped_blkaddr: int = 0

    def pack(self) -> bytes:
        return DEVICE_SLOT.pack(self.tag, self.blocks, self.mapped_blkaddr, bytes(56))

    @classmethod
    def unpack(cls, buf: bytes, offset: int) -> DeviceSlot:
        _need(buf, offset, DEVICE_SLOT.size, "device slot")
        tag, blocks, mapped, _ = DEVICE_SLOT.unpack_from(buf, offset)
        return cls(tag, blocks, mapped)


class BlobEntry(msgspec.Struct, frozen=True):
    blob_id: bytes
    blob_index: int
    chunk_size: int
    chunk_count: int
    compression_algo: int
    digest_algo: int
    meta_features: int
    compressed_size: int
    uncompressed_size: int
    reserved1: int
    ci_compressor: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    ci_digest: bytes = bytes(32)

    def pack(self) -> bytes:
        return BLOB_ENTRY.pack(
            self.blob_id, self.blob_index, self.chunk_size, self.chunk_count,
            self.compression_algo, self.digest_algo, self.meta_features, self.compressed_size,
            self.uncompressed_size, self.reserved1, self.ci_compressor, self.ci_offset,
            self.ci_compressed_size, self.ci_uncompressed_size, self.ci_digest, bytes(88),
        )

    @classmethod
    def unpack(cls, buf: bytes, offset: int) -> BlobEntry:
        _need(buf, offset, BLOB_ENTRY.size, "blob table entry")
        return cls(*BLOB_ENTRY.unpack_from(buf, offset)[:15])


class Inode(msgspec.Struct, frozen=True):
    """Either on-disk inode form, widened: `extended` tells which one it was."""

    extended: bool
    format: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int

    @property
    def layout(self) -> int:
        return (self.format >> 1) & 0x7

    @property
    def inode_size(self) -> int:
        return INODE_EXTENDED.size if self.extended else INODE_COMPACT.size

    @property
    def xattr_size(self) -> int:
        return xattr_size_from_icount(self.xattr_icount)

    def pack(self) -> bytes:
        if self.extended:
            return INODE_EXTENDED.pack(
                self.format, self.xattr_icount, self.mode, 0, self.size, self.i_u, self.ino,
                self.uid, self.gid, self.mtime, self.mtime_nsec, self.nlink, bytes(16),
            )
        return INODE_COMPACT.pack(
            self.format, self.xattr_icount, self.mode, self.nlink, self.size, 0, self.i_u,
            self.ino, self.uid, self.gid, 0,
        )

    @classmethod
    def unpack(cls, buf: bytes, offset: int, *, build_time: int = 0, build_time_nsec: int = 0) -> Inode:
        """Compact inodes carry no mtime: EROFS takes the superblock build time."""
        _need(buf, offset, 2, "inode")
        (fmt,) = struct.unpack_from("<H", buf, offset)
        if fmt & FORMAT_EXTENDED_BIT:
            _need(buf, offset, INODE_EXTENDED.size, "extended inode")
            f, icount, mode, _nb, size, i_u, ino, uid, gid, mtime, nsec, nlink, _ = INODE_EXTENDED.unpack_from(
                buf, offset
            )
            return cls(True, f, icount, mode, nlink, size, i_u, ino, uid, gid, mtime, nsec)
        _need(buf, offset, INODE_COMPACT.size, "compact inode")
        f, icount, mode, nlink, size, _r, i_u, ino, uid, gid, _r2 = INODE_COMPACT.unpack_from(buf, offset)
        return cls(False, f, icount, mode, nlink, size, i_u, ino, uid, gid, build_time, build_time_nsec)


class Dirent(msgspec.Struct, frozen=True):
    nid: int
    nameoff: int
    file_type: int

    def pack(self) -> bytes:
        return DIRENT.pack(self.nid, self.nameoff, self.file_type, 0)

    @classmethod
    def unpack(cls, buf: bytes, offset: int) -> Dirent:
        _need(buf, offset, DIRENT.size, "dirent")
        nid, nameoff, ftype, _ = DIRENT.unpack_from(buf, offset)
        return cls(nid, nameoff, ftype)


class ChunkIndex(msgspec.Struct, frozen=True):
    """Kernel erofs_inode_chunk_index as nydus fills it (device = blob_index + 1)."""

    chunk_index: int
    device_id: int
    blkaddr: int

    def pack(self) -> bytes:
        return CHUNK_INDEX.pack(
            self.chunk_index & 0xFFFF, (self.device_id & 0xFF) | (((self.chunk_index >> 16) & 0xFF) << 8), self.blkaddr
        )

    @classmethod
    def unpack(cls, buf: bytes, offset: int) -> ChunkIndex:
        _need(buf, offset, CHUNK_INDEX.size, "chunk index")
        low, device, blkaddr = CHUNK_INDEX.unpack_from(buf, offset)
        return cls(low | ((device >> 8) << 16), device & 0xFF, blkaddr)


class ChunkRecord(msgspec.Struct, frozen=True):
    """RafsV5ChunkInfo, the 80-byte chunk table record nydusd indexes by (blob, index, blkaddr)."""

    block_id: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int

    def pack(self) -> bytes:
        return CHUNK_RECORD.pack(
            self.block_id, self.blob_index, self.flags, self.compressed_size, self.uncompressed_size,
            self.compressed_offset, self.uncompressed_offset, self.file_offset, self.index, 0,
        )

    @classmethod
    def unpack(cls, buf: bytes, offset: int) -> ChunkRecord:
        _need(buf, offset, CHUNK_RECORD.size, "chunk table record")
        return cls(*CHUNK_RECORD.unpack_from(buf, offset)[:9])

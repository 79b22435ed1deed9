"""Any RAFS v6 bootstrap (ours or nydus-image's) → the shared tree + blob table.

`BootstrapReader` gives bounds-checked access to single structures (check and inspect use
it to report per item); `read_bootstrap` walks everything into a `RafsImage` for merge.
Every malformed byte surfaces as FormatError naming what and where, never IndexError.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable

from stargzfs.errors import FormatError
from stargzfs.rafs.ondisk import (
    BLOB_ENTRY,
    BLOCK_BITS,
    BLOCK_SIZE,
    CHUNK_FORMAT_BLKBITS_MASK,
    CHUNK_FORMAT_INDEXES,
    CHUNK_INDEX,
    CHUNK_RECORD,
    COMPRESSOR_ALGOS,
    COMPRESSOR_FLAGS,
    DEVICE_SLOT,
    DIGESTER_ALGOS,
    DIGESTER_FLAGS,
    DIRENT,
    EROFS_MAGIC,
    FEATURE_COMPAT_RAFS_V6,
    FLAG_COMPRESS_NONE,
    FLAG_DIGESTER_SHA256,
    FLAG_EXPLICIT_UID_GID,
    FLAG_HAS_XATTR,
    INODE_EXTENDED,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    XATTR_ENTRY,
    XATTR_IBODY_HEADER,
    XATTR_PREFIXES,
    BlobEntry,
    ChunkIndex,
    ChunkRecord,
    DeviceSlot,
    ExtSuperBlock,
    Inode,
    SuperBlock,
)
from stargzfs.rafs.tree import NO_CHUNKS, NO_XATTRS, BlobInfo, ChunkRef, LinkGroup, Node, RafsImage

NULL_ADDR = 0xFFFFFFFF
_S_IFMT, _S_IFREG, _S_IFDIR = 0o170000, stat.S_IFREG, stat.S_IFDIR
_COMPRESSOR_BY_ALGO = {v: k for k, v in COMPRESSOR_ALGOS.items()}
_DIGESTER_BY_ALGO = {v: k for k, v in DIGESTER_ALGOS.items()}


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def flags_compressor(flags: int) -> str | None:
    names = [name for name, bit in COMPRESSOR_FLAGS.items() if flags & bit]
    return names[0] if len(names) == 1 else None


def flags_digester(flags: int) -> str | None:
    names = [name for name, bit in DIGESTER_FLAGS.items() if flags & bit]
    return names[0] if len(names) == 1 else None


class BootstrapReader:
    """Parsed superblocks plus bounds-checked accessors for inodes, dirents and tables."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        if len(data) < BLOCK_SIZE or len(data) % BLOCK_SIZE:
            raise FormatError(f"bootstrap size {len(data)} is not a non-zero multiple of 4096 (truncated?)")
        self.sb = SuperBlock.unpack(data)
        if self.sb.magic != EROFS_MAGIC:
            raise FormatError(f"bad EROFS magic {self.sb.magic:#010x} at offset 1024 (not a RAFS v6 bootstrap)")
        if self.sb.blkszbits != BLOCK_BITS:
            raise FormatError(f"block size 2^{self.sb.blkszbits} is not supported (need 4096)")
        #: plain EROFS images (mkfs.erofs) have no RAFS extended superblock: block 0 past the
        #: superblock may hold inodes, so it is not read; such an image has no blobs/chunks.
        self.is_rafs = bool(self.sb.feature_compat & FEATURE_COMPAT_RAFS_V6)
        if self.is_rafs:
            self.ext = ExtSuperBlock.unpack(data)
        else:
            self.ext = ExtSuperBlock(flags=FLAG_COMPRESS_NONE | FLAG_DIGESTER_SHA256, chunk_size=0x100000)
        self.meta_base = self.sb.meta_blkaddr * BLOCK_SIZE

    # --- raw access -----------------------------------------------------------------------
    def slice(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise FormatError(f"{what}: [{offset}, {offset + size}) lies outside the {len(self.data)}-byte bootstrap")
        return self.data[offset:offset + size]

    def inode_offset(self, nid: int) -> int:
        return self.meta_base + 32 * nid

    # --- tables ---------------------------------------------------------------------------
    def device_slots(self) -> list[DeviceSlot]:
        base = self.sb.devt_slotoff * 128
        self.slice(base, DEVICE_SLOT.size * self.sb.extra_devices, "device slot table")
        return [DeviceSlot.unpack(self.data, base + DEVICE_SLOT.size * i) for i in range(self.sb.extra_devices)]

    def blob_entries(self) -> list[BlobEntry]:
        size = self.ext.blob_table_size
        if size % BLOB_ENTRY.size:
            raise FormatError(f"blob table size {size} is not a multiple of {BLOB_ENTRY.size}")
        self.slice(self.ext.blob_table_offset, size, "blob table")
        return [BlobEntry.unpack(self.data, self.ext.blob_table_offset + BLOB_ENTRY.size * i)
                for i in range(size // BLOB_ENTRY.size)]

    def chunk_table(self) -> bytes:
        """The chunk table's bytes, bounds-checked: CHUNK_RECORD.size bytes per record."""
        size = self.ext.chunk_table_size
        if size % CHUNK_RECORD.size:
            raise FormatError(f"chunk table size {size} is not a multiple of {CHUNK_RECORD.size}")
        return self.slice(self.ext.chunk_table_offset, size, "chunk table")

    def chunk_records(self) -> list[ChunkRecord]:
        return [ChunkRecord(*fields[:9]) for fields in CHUNK_RECORD.iter_unpack(self.chunk_table())]

    # --- inodes ---------------------------------------------------------------------------
    def inode(self, nid: int) -> Inode:
        offset = self.inode_offset(nid)
        try:
            return Inode.unpack(self.data, offset, build_time=self.sb.build_time,
                                build_time_nsec=self.sb.build_time_nsec)
        except FormatError as exc:
            raise FormatError(f"inode nid {nid}: {exc}") from None

    def xattrs(self, nid: int, inode: Inode) -> list[tuple[bytes, bytes]]:
        size = inode.xattr_size
        if size == 0:
            return []
        base = self.inode_offset(nid) + inode.inode_size
        body = self.slice(base, size, f"xattrs of nid {nid}")
        _, shared_count, _ = XATTR_IBODY_HEADER.unpack_from(body, 0)
        pos = XATTR_IBODY_HEADER.size
        out: list[tuple[bytes, bytes]] = []
        for _ in range(shared_count):
            if pos + 4 > size:
                raise FormatError(f"nid {nid}: shared xattr ids overrun the xattr body")
            (xid,) = struct.unpack_from("<I", body, pos)
            pos += 4
            shared_at = self.sb.xattr_blkaddr * BLOCK_SIZE + 4 * xid
            entry, _ = self._xattr_entry(self.data, shared_at, len(self.data), f"shared xattr {xid} of nid {nid}")
            out.append(entry)
        while pos < size:
            entry, pos = self._xattr_entry(body, pos, size, f"xattr of nid {nid}")
            out.append(entry)
        out.sort()
        return out

    @staticmethod
    def _xattr_entry(buf: bytes, pos: int, limit: int, what: str) -> tuple[tuple[bytes, bytes], int]:
        if pos + XATTR_ENTRY.size > limit:
            raise FormatError(f"{what}: entry header at {pos} overruns the xattr area")
        name_len, index, value_size = XATTR_ENTRY.unpack_from(buf, pos)
        start = pos + XATTR_ENTRY.size
        end = start + name_len + value_size
        if end > limit:
            raise FormatError(f"{what}: entry at {pos} ({name_len}+{value_size} bytes) overruns the xattr area")
        prefix = XATTR_PREFIXES.get(index)
        if prefix is None:
            raise FormatError(f"{what}: unknown xattr name index {index}")
        name = prefix + bytes(buf[start:start + name_len])
        return (name, bytes(buf[start + name_len:end])), (end + 3) & ~3

    def inline_data(self, nid: int, inode: Inode) -> bytes:
        """Contents of a FLAT_PLAIN / FLAT_INLINE inode (dirents, symlink target)."""
        size = inode.size
        if size > len(self.data):
            raise FormatError(f"nid {nid}: size {size} exceeds the bootstrap")
        if inode.layout == LAYOUT_FLAT_PLAIN:
            return self.slice(inode.i_u * BLOCK_SIZE, size, f"data of nid {nid}")
        if inode.layout == LAYOUT_FLAT_INLINE:
            tail = size % BLOCK_SIZE
            full = size - tail
            head = self.slice(inode.i_u * BLOCK_SIZE, full, f"data blocks of nid {nid}") if full else b""
            tail_at = self.inode_offset(nid) + inode.inode_size + inode.xattr_size
            if tail_at % BLOCK_SIZE + tail > BLOCK_SIZE:
                raise FormatError(f"nid {nid}: inline tail of {tail} bytes crosses a block boundary")
            return head + self.slice(tail_at, tail, f"inline tail of nid {nid}")
        raise FormatError(f"nid {nid}: data layout {inode.layout} is not supported for directories/symlinks")

    def dirents(self, nid: int, inode: Inode) -> list[tuple[bytes, int, int]]:
        """(name, nid, file_type) in on-disk order, "." and ".." included."""
        data = self.inline_data(nid, inode)
        out: list[tuple[bytes, int, int]] = []
        for block_start in range(0, len(data), BLOCK_SIZE):
            block = data[block_start:block_start + BLOCK_SIZE]
            if len(block) < DIRENT.size:
                raise FormatError(f"directory nid {nid}: dirent block at {block_start} is truncated")
            first_nameoff = struct.unpack_from("<H", block, 8)[0]
            if first_nameoff < DIRENT.size or first_nameoff % DIRENT.size or first_nameoff > len(block):
                raise FormatError(f"directory nid {nid}: bad first nameoff {first_nameoff} in block at {block_start}")
            count = first_nameoff // DIRENT.size
            entries = list(DIRENT.iter_unpack(block[:first_nameoff]))
            block_len = len(block)
            ends = [entry[1] for entry in entries[1:]]
            ends.append(block_len)
            for i, ((child, nameoff, ftype, _), end) in enumerate(zip(entries, ends)):
                if not first_nameoff <= nameoff <= end <= block_len:
                    raise FormatError(f"directory nid {nid}: dirent {i} name [{nameoff}, {end}) out of bounds")
                name = block[nameoff:end]
                if i + 1 == count:
                    name = name.split(b"\0", 1)[0]
                if not name:
                    raise FormatError(f"directory nid {nid}: empty name in dirent {i}")
                out.append((bytes(name), child, ftype))
        return out

    def chunk_indexes(self, nid: int, inode: Inode) -> list[ChunkIndex]:
        if inode.layout != LAYOUT_CHUNK_BASED:
            raise FormatError(f"nid {nid}: regular file layout {inode.layout} is not chunk-based")
        if not inode.i_u & CHUNK_FORMAT_INDEXES:
            raise FormatError(f"nid {nid}: block-map chunk format {inode.i_u:#x} is not supported")
        chunk_bits = BLOCK_BITS + (inode.i_u & CHUNK_FORMAT_BLKBITS_MASK)
        count = -(-inode.size // (1 << chunk_bits))
        base = _round_up(self.inode_offset(nid) + inode.inode_size + inode.xattr_size, 8)
        raw = self.slice(base, CHUNK_INDEX.size * count, f"chunk indexes of nid {nid}")
        return [ChunkIndex(low | ((dev >> 8) << 16), dev & 0xFF, blk) for low, dev, blk in CHUNK_INDEX.iter_unpack(raw)]


def _blob_info(entry: BlobEntry) -> BlobInfo:
    return BlobInfo(
        blob_id=entry.blob_id.rstrip(b"\0").decode("ascii", "replace"),
        chunk_count=entry.chunk_count,
        chunk_size=entry.chunk_size,
        compressed_size=entry.compressed_size,
        uncompressed_size=entry.uncompressed_size,
        compressor=_COMPRESSOR_BY_ALGO.get(entry.compression_algo, "gzip"),
        digester=_DIGESTER_BY_ALGO.get(entry.digest_algo, "sha256"),
        meta_features=entry.meta_features,
        ci_compressor=entry.ci_compressor,
        ci_offset=entry.ci_offset,
        ci_compressed_size=entry.ci_compressed_size,
        ci_uncompressed_size=entry.ci_uncompressed_size,
    )


def chunk_table_map(records: list[ChunkRecord]) -> dict[tuple[int, int, int], ChunkRecord]:
    """nydusd's lookup key: (blob_index, chunk index, uncompressed block address)."""
    return {(r.blob_index, r.index, r.uncompressed_offset // BLOCK_SIZE): r for r in records}


BlobPositions = Callable[[list[BlobInfo]], list[int]]


def read_bootstrap(data: bytes, *, blob_positions: BlobPositions | None = None) -> RafsImage:
    """Whole bootstrap → RafsImage (nids kept in Node.nid); FormatError on any inconsistency.

    `blob_positions` (merge) is called with the blob table before the tree is read and
    returns each blob's index in the caller's table; chunk refs are made with those indexes,
    so a merge does not renumber every chunk afterwards.
    """
    reader = BootstrapReader(data)
    flags = reader.ext.flags
    blobs = [_blob_info(entry) for entry in reader.blob_entries()]
    positions = blob_positions(blobs) if blob_positions is not None else None
    if positions is not None and positions == list(range(len(blobs))):
        positions = None
    root_inode = reader.inode(reader.sb.root_nid)
    if not stat.S_ISDIR(root_inode.mode):
        raise FormatError(f"root nid {reader.sb.root_nid} is not a directory (mode {root_inode.mode:#o})")
    root = _TreeReader(reader, len(blobs), positions).read(root_inode)
    compressor = flags_compressor(flags)
    digester = flags_digester(flags)
    if compressor is None or digester is None:
        raise FormatError(f"extended superblock flags {flags:#x} need exactly one compressor and one digester bit")
    return RafsImage(
        root=root,
        blobs=blobs,
        chunk_size=reader.ext.chunk_size,
        compressor=compressor,
        digester=digester,
        explicit_uid_gid=bool(flags & FLAG_EXPLICIT_UID_GID),
        force_has_xattr=bool(flags & FLAG_HAS_XATTR),
        root_ino=root_inode.ino,
    )


class _Slow(Exception):
    """The fast path met something it does not decode itself: take the checked path."""


class _TreeReader:
    """Walks the directory tree from the root, one Node per path (hardlinks share a
    LinkGroup). Half of a merge is spent here, so the common node — an extended inode
    without xattrs — is decoded straight from the bytes: one `unpack_from`, and chunk
    indexes looked up by their 8 on-disk bytes in a table of ready ChunkRefs (one per
    chunk-table record, shared by every file that uses it). Anything else, and every
    error, goes through BootstrapReader's checked accessors (`_checked_node`), so
    messages stay precise.
    """

    def __init__(self, reader: BootstrapReader, blob_count: int, positions: list[int] | None) -> None:
        self.reader = reader
        data = reader.data
        self.data = data if type(data) is bytes else bytes(data)  # slices must be hashable keys
        self.data_len = len(self.data)
        self.meta_base = reader.meta_base
        self.blob_count = blob_count
        self.positions = positions
        self.refs = _refs_by_index_bytes(reader.chunk_table(), blob_count, positions)
        self._table: dict[tuple[int, int, int], ChunkRecord] | None = None  # for the checked path only

    def read(self, root_inode: Inode) -> Node:
        reader = self.reader
        root_nid = reader.sb.root_nid
        root = self._checked_node(b"", root_nid, root_inode)
        seen_dirs = {root_nid}
        first_by_nid: dict[int, Node] = {}
        stack = [(root, root_nid, root_inode)]
        while stack:
            directory, dir_nid, dir_inode = stack.pop()
            children = directory.children
            assert children is not None
            for name, nid, _ftype in reader.dirents(dir_nid, dir_inode):
                if name == b"." or name == b"..":
                    continue
                if b"/" in name or name in children:
                    raise FormatError(f"directory nid {dir_nid}: invalid or duplicate name {name!r}")
                first = first_by_nid.get(nid)
                if first is not None:
                    child = _hardlink(name, nid, first)
                else:
                    child = self._node(name, nid)
                    if child.children is not None:
                        if nid in seen_dirs:
                            raise FormatError(f"directory nid {nid} is reachable twice (loop or hardlinked directory)")
                        seen_dirs.add(nid)
                        stack.append((child, nid, reader.inode(nid)))
                    else:
                        first_by_nid[nid] = child
                children[name] = child
        return root

    def _node(self, name: bytes, nid: int) -> Node:
        """The node at `nid`, decoded directly when it is a plain extended inode."""
        offset = self.meta_base + 32 * nid
        data = self.data
        try:
            if not data[offset] & 1 or data[offset + 2] or data[offset + 3]:  # compact, or i_xattr_icount
                raise _Slow
            fmt, _, mode, _, size, i_u, _, uid, gid, mtime, nsec, _, _ = INODE_EXTENDED.unpack_from(data, offset)
            kind = mode & _S_IFMT
            if kind == _S_IFREG:
                chunks = self._chunks(offset, fmt, size, i_u) if size else NO_CHUNKS
                node = Node(name, mode, uid, gid, mtime, nsec, size, 0, None, NO_XATTRS, chunks, None, None, nid)
            elif kind == _S_IFDIR:
                node = Node(name, mode, uid, gid, mtime, nsec, size, 0, None, NO_XATTRS, NO_CHUNKS, {}, None, nid)
            else:
                raise _Slow
        except (_Slow, IndexError, KeyError, struct.error):
            return self._checked_node(name, nid, self.reader.inode(nid))
        return node

    def _chunks(self, offset: int, fmt: int, size: int, i_u: int) -> list[ChunkRef]:
        """A regular file's ChunkRefs; KeyError/_Slow send it to the checked path."""
        if (fmt >> 1) & 0x7 != LAYOUT_CHUNK_BASED or not i_u & CHUNK_FORMAT_INDEXES:
            raise _Slow
        count = -(-size >> (BLOCK_BITS + (i_u & CHUNK_FORMAT_BLKBITS_MASK)))
        start = (offset + INODE_EXTENDED.size + 7) & -8
        end = start + CHUNK_INDEX.size * count
        if end > self.data_len:
            raise _Slow
        data, refs = self.data, self.refs
        if count == 1:  # most files: one chunk
            return [refs[data[start:end]]]
        return [refs[data[position:position + 8]] for position in range(start, end, 8)]

    def _checked_node(self, name: bytes, nid: int, inode: Inode) -> Node:
        """Any inode through the bounds-checked accessors: precise FormatErrors."""
        reader = self.reader
        node = Node(name, inode.mode, uid=inode.uid, gid=inode.gid, mtime=inode.mtime,
                    mtime_nsec=inode.mtime_nsec, size=inode.size, xattrs=reader.xattrs(nid, inode), nid=nid)
        kind = stat.S_IFMT(inode.mode)
        if kind == stat.S_IFDIR:
            node.children = {}
        elif kind == stat.S_IFLNK:
            node.symlink = reader.inline_data(nid, inode)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev, node.size = inode.i_u, 0
        elif kind == stat.S_IFREG:
            if inode.size:
                if self._table is None:
                    self._table = chunk_table_map(reader.chunk_records())
                node.chunks = _chunks(reader, self._table, nid, inode, self.blob_count)
                if self.positions is not None:
                    node.chunks = [ref._replace(blob_index=self.positions[ref.blob_index]) for ref in node.chunks]
        elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
            node.size = 0
        else:
            raise FormatError(f"nid {nid}: unknown file type in mode {inode.mode:#o}")
        return node


def _hardlink(name: bytes, nid: int, first: Node) -> Node:
    """Another path of `first`'s inode."""
    if first.link is None:
        first.link = LinkGroup()
    child = Node(name, first.mode, nid=nid, link=first.link)
    child.copy_attributes_from(first)
    return child


def _refs_by_index_bytes(table: bytes, blob_count: int, positions: list[int] | None) -> dict[bytes, ChunkRef]:
    """The 8 on-disk bytes of the chunk index that finds each chunk-table record (nydusd's
    key (blob, chunk index, block address)) → its ChunkRef, whose blob index is taken from
    `positions` when given. Records no index can name (blob out of range, index beyond 24
    bits, the null block address) are left out, so their lookups fail into the checked path
    as before."""
    refs: dict[bytes, ChunkRef] = {}
    pack = CHUNK_INDEX.pack
    reachable = min(blob_count, 0xFF)  # device ids are one byte and start at 1
    make_ref = tuple.__new__  # ChunkRef(...) costs twice as much; fields in ChunkRef order
    for block_id, blob_index, _, csize, usize, coff, uoff, foff, index, _ in CHUNK_RECORD.iter_unpack(table):
        blkaddr = uoff // BLOCK_SIZE
        if blob_index < reachable and index < 1 << 24 and blkaddr < NULL_ADDR:
            key = pack(index & 0xFFFF, ((blob_index + 1) & 0xFF) | ((index >> 16) << 8), blkaddr)
            position = blob_index if positions is None else positions[blob_index]
            refs[key] = make_ref(ChunkRef, (position, index, uoff, usize, coff, csize, foff, block_id))
    return refs


def _chunks(
    reader: BootstrapReader, table: dict[tuple[int, int, int], ChunkRecord], nid: int, inode: Inode, blob_count: int
) -> list[ChunkRef]:
    refs: list[ChunkRef] = []
    for position, index in enumerate(reader.chunk_indexes(nid, inode)):
        blob_index = index.device_id - 1
        if not 0 <= blob_index < blob_count or index.blkaddr == NULL_ADDR:
            raise FormatError(f"nid {nid}: chunk {position} refers to device {index.device_id} (have {blob_count} blobs)")
        record = table.get((blob_index, index.chunk_index, index.blkaddr))
        if record is None:
            raise FormatError(
                f"nid {nid}: chunk {position} (blob {blob_index}, index {index.chunk_index}, block {index.blkaddr}) "
                "has no chunk table record"
            )
        refs.append(
            ChunkRef(blob_index, record.index, record.uncompressed_offset, record.uncompressed_size,
                     record.compressed_offset, record.compressed_size, record.file_offset, record.block_id)
        )
    return refs

"""Tree + blob table → RAFS v6 bootstrap bytes in the v2.1 file map (rafs-v6 §2.1, §2.11).

One preallocated bytearray, filled with `struct.pack_into`; no per-inode bytes objects, so
memory stays proportional to the tree, not to Python temporaries.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import operator
import stat
from collections.abc import Callable

from stargzfs.errors import UnsupportedError
from stargzfs.rafs.layout import DIR, FILE, SYMLINK, Layout, Placement, compute_layout
from stargzfs.rafs.ondisk import (
    BLOB_ENTRY,
    BLOB_FEATURE_ALIGNED,
    BLOB_ID_LEN,
    BLOCK_SIZE,
    CHUNK_FLAG_COMPRESSED,
    CHUNK_INDEX,
    CHUNK_RECORD,
    COMPRESSOR_ALGOS,
    COMPRESSOR_FLAGS,
    DEVICE_SLOT,
    DEVT_SLOT_OFFSET,
    DIGESTER_ALGOS,
    DIGESTER_FLAGS,
    DIRENT,
    EXT_SUPERBLOCK_OFFSET,
    FILE_TYPE_BY_IFMT,
    FLAG_EXPLICIT_UID_GID,
    FLAG_HAS_XATTR,
    INODE_EXTENDED,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    MAX_CHUNK_COUNT,
    SUPERBLOCK_OFFSET,
    XATTR_ENTRY,
    XATTR_IBODY_HEADER,
    ExtSuperBlock,
    SuperBlock,
    chunk_format,
    i_format,
    split_xattr_name,
)
from stargzfs.rafs.tree import ChunkRef, Node, RafsImage

_EMPTY16 = bytes(16)
_FORMAT_PLAIN = i_format(True, LAYOUT_FLAT_PLAIN)
_FORMAT_INLINE = i_format(True, LAYOUT_FLAT_INLINE)
_FORMAT_CHUNKED = i_format(True, LAYOUT_CHUNK_BASED)
MAX_INODE_FIELD = 0xFFFFFFFF
DIRENT_SIZE = DIRENT.size
_S_IFMT, _S_IFREG, _S_IFCHR, _S_IFBLK = 0o170000, stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def blob_table_offset(blob_count: int) -> int:
    return _round_up(DEVT_SLOT_OFFSET + 128 * blob_count, BLOCK_SIZE)


def meta_addr_for(blob_count: int) -> int:
    """v2.1: an unused zero block after the blob table; none at all without blobs."""
    if blob_count == 0:
        return 0
    return _round_up(blob_table_offset(blob_count) + BLOB_ENTRY.size * blob_count, BLOCK_SIZE)


def superblock_flags(image: RafsImage, has_xattr: bool) -> int:
    try:
        flags = COMPRESSOR_FLAGS[image.compressor] | DIGESTER_FLAGS[image.digester]
    except KeyError as exc:
        raise UnsupportedError(f"unknown compressor/digester {exc.args[0]!r}") from None
    if image.explicit_uid_gid:
        flags |= FLAG_EXPLICIT_UID_GID
    if has_xattr or image.force_has_xattr:
        flags |= FLAG_HAS_XATTR
    return flags


def write_bootstrap(
    image: RafsImage, *, allocate: Callable[[int], bytearray | mmap.mmap] | None = None
) -> bytearray | mmap.mmap:
    """Lay out and serialise; UnsupportedError when a value does not fit the format.

    Returns the buffer it filled (not a bytes copy: at a million inodes that copy alone
    was 200 MB of peak memory): a zeroed bytearray, or what `allocate(size)` returns, such
    as a shared mapping of the output file (`AtomicFile.map`), whose pages are handed to the
    page cache as it fills instead of all staying in the builder's memory at once."""
    blobs = image.blobs
    for index, blob in enumerate(blobs):
        if len(blob.blob_id.encode()) != BLOB_ID_LEN:
            raise UnsupportedError(f"blob id {blob.blob_id!r} must be exactly {BLOB_ID_LEN} characters")
        if blob.chunk_count >= MAX_CHUNK_COUNT:
            raise UnsupportedError(f"blob {index}: {blob.chunk_count} chunks exceed the RAFS limit of 2^24")
    layout = compute_layout(image.root, chunk_size=image.chunk_size, root_ino=image.root_ino)
    meta_addr = meta_addr_for(len(blobs))
    records = _chunk_records(layout, len(blobs))
    meta_end = meta_addr + layout.end
    chunk_table_offset = _round_up(meta_end, BLOCK_SIZE)
    chunk_table_size = CHUNK_RECORD.size * len(records)
    total = _round_up(chunk_table_offset + chunk_table_size, BLOCK_SIZE)
    buf = allocate(total) if allocate is not None else bytearray(total)

    relieve = _relief(buf)
    has_xattr = _emit_inodes(buf, layout, meta_addr, image.chunk_size, relieve)
    _emit_chunk_table(buf, chunk_table_offset, records, relieve)
    del records
    bt_offset = blob_table_offset(len(blobs))
    for index, blob in enumerate(blobs):
        blob_id = blob.blob_id.encode()
        DEVICE_SLOT.pack_into(buf, DEVT_SLOT_OFFSET + 128 * index, blob_id, blob.uncompressed_size >> 12, 0, bytes(56))
        BLOB_ENTRY.pack_into(
            buf, bt_offset + BLOB_ENTRY.size * index,
            blob_id, index, blob.chunk_size, blob.chunk_count,
            COMPRESSOR_ALGOS.get(blob.compressor, 2), DIGESTER_ALGOS.get(blob.digester, 1),
            blob.meta_features | BLOB_FEATURE_ALIGNED, blob.compressed_size, blob.uncompressed_size, 0,
            blob.ci_compressor, blob.ci_offset, blob.ci_compressed_size, blob.ci_uncompressed_size,
            bytes(32), bytes(88),
        )
    superblock = SuperBlock(
        inos=layout.inode_count,
        blocks=total // BLOCK_SIZE,
        meta_blkaddr=meta_addr // BLOCK_SIZE,
        extra_devices=len(blobs),
    )
    buf[SUPERBLOCK_OFFSET:SUPERBLOCK_OFFSET + 128] = superblock.pack()
    ext = ExtSuperBlock(
        flags=superblock_flags(image, has_xattr),
        blob_table_offset=bt_offset,
        blob_table_size=BLOB_ENTRY.size * len(blobs),
        chunk_size=image.chunk_size,
        chunk_table_offset=chunk_table_offset,
        chunk_table_size=chunk_table_size,
    )
    buf[EXT_SUPERBLOCK_OFFSET:EXT_SUPERBLOCK_OFFSET + 256] = ext.pack()
    return buf


_RELIEF_BATCH = 1 << 16  # inodes emitted between hand-backs of a mapped output's pages


def _relief(buf: bytearray | mmap.mmap) -> Callable[[], None]:
    """For a shared file mapping: drop the filled pages from this process (they stay in the
    page cache, dirty, and reach the file); a 1M-entry image is 190 MB of them."""
    if isinstance(buf, mmap.mmap):
        return functools.partial(buf.madvise, mmap.MADV_DONTNEED)
    return _nothing


def _nothing() -> None:
    pass


def _chunk_records(layout: Layout, blob_count: int) -> list[ChunkRef]:
    """The chunk table: one record per (block_id, blob), sorted by that key; of refs with
    the same key (hardlinks share theirs) the last in placement order is the record.

    Block ids are always 32 bytes, so with one blob the block id alone is the key. The
    records are sorted by a key taken from each, never looked up again by key afterwards:
    at a million chunks those lookups are cache misses that cost more than the sort.
    """
    files = [placement.node.chunks for placement in layout.placements if placement.kind == FILE]
    if blob_count > 1:
        return _records_of_blobs(files)
    records: dict[bytes, ChunkRef] = {}
    for chunks in files:
        for ref in chunks:
            records[ref[7]] = ref  # ChunkRef.block_id
    return sorted(records.values(), key=_BLOCK_ID_OF)


_BLOCK_ID_OF = operator.itemgetter(7)  # ChunkRef.block_id


def _records_of_blobs(files: list[list[ChunkRef]]) -> list[ChunkRef]:
    """_chunk_records for several blobs (merge), where refs are shared more often (one per
    source chunk-table record): every ref is sorted by block id without a dict first, and
    equal block ids, now adjacent and in placement order (the sort is stable), are found
    by comparing neighbours."""
    refs = sorted(itertools.chain.from_iterable(files), key=_BLOCK_ID_OF)
    block_ids = list(map(_BLOCK_ID_OF, refs))
    unlike_next = list(map(operator.ne, block_ids, itertools.islice(block_ids, 1, None)))
    del block_ids
    if all(unlike_next):
        return refs
    repeated = itertools.compress(itertools.count(), map(operator.not_, unlike_next))
    if any(refs[at][0] != refs[at + 1][0] for at in repeated):  # ChunkRef.blob_index
        # Block ids of different blobs differ unless two blobs share a chunk (builders
        # hashing content): then, and only then, the key needs the blob index too.
        return _chunk_records_by_blob(files)
    unlike_next.append(True)
    return list(itertools.compress(refs, unlike_next))  # the last of each run


def _chunk_records_by_blob(files: list[list[ChunkRef]]) -> list[ChunkRef]:
    """As _chunk_records, keyed by block_id + big-endian blob index (bytes order is
    (block_id, blob_index) order, and bytes sort much faster than tuples)."""
    records: dict[bytes, ChunkRef] = {}
    for chunks in files:
        for ref in chunks:
            records[ref.block_id + ref.blob_index.to_bytes(4, "big")] = ref
    return [records[key] for key in sorted(records)]


def _emit_chunk_table(
    buf: bytearray | mmap.mmap, offset: int, refs: list[ChunkRef], relieve: Callable[[], None]
) -> None:
    """The chunk table, records in `refs` order (unpacking each ChunkRef tuple in the loop
    header is the cheapest way to reach its fields)."""
    pack_record = CHUNK_RECORD.pack_into
    for first in range(0, len(refs), _RELIEF_BATCH):
        for blob_index, chunk_index, uoff, usize, coff, csize, file_offset, block_id in refs[first:first + _RELIEF_BATCH]:
            pack_record(
                buf, offset, block_id, blob_index, CHUNK_FLAG_COMPRESSED, csize, usize, coff, uoff, file_offset,
                chunk_index, 0,
            )
            offset += CHUNK_RECORD.size
        relieve()


def _emit_xattrs(buf: bytearray, pos: int, xattrs: list[tuple[bytes, bytes]]) -> None:
    XATTR_IBODY_HEADER.pack_into(buf, pos, 0, 0, bytes(7))
    pos += XATTR_IBODY_HEADER.size
    for name, value in xattrs:
        index, suffix = split_xattr_name(name)  # type: ignore[misc]  # validated by the layout
        XATTR_ENTRY.pack_into(buf, pos, len(suffix), index, len(value))
        start = pos + XATTR_ENTRY.size
        buf[start:start + len(suffix)] = suffix
        buf[start + len(suffix):start + len(suffix) + len(value)] = value
        pos += (XATTR_ENTRY.size + len(suffix) + len(value) + 3) & ~3


def _check_fields(node: Node) -> None:
    if node.uid > MAX_INODE_FIELD or node.gid > MAX_INODE_FIELD:
        raise UnsupportedError(f"{node.name!r}: uid/gid {node.uid}/{node.gid} do not fit in 32 bits")
    if not 0 <= node.mtime < 1 << 64:
        raise UnsupportedError(f"{node.name!r}: mtime {node.mtime} does not fit the inode")


def _emit_inodes(
    buf: bytearray | mmap.mmap, layout: Layout, meta_addr: int, chunk_size: int, relieve: Callable[[], None]
) -> bool:
    nlink_of_group = layout.nlink_of_group
    pack_inode = INODE_EXTENDED.pack_into
    pack_index = CHUNK_INDEX.pack_into
    chunked_i_u = chunk_format(chunk_size)
    inode_base = INODE_EXTENDED.size
    has_xattr = False
    placements = layout.placements
    for first in range(0, len(placements), _RELIEF_BATCH):
        for p in placements[first:first + _RELIEF_BATCH]:
            node = p.node
            uid, gid, mtime = node.uid, node.gid, node.mtime
            if uid > MAX_INODE_FIELD or gid > MAX_INODE_FIELD or not 0 <= mtime < 1 << 64:
                _check_fields(node)  # raises the precise error
            mode = node.mode
            kind = p.kind
            pos = meta_addr + p.addr
            xattr_size = p.xattr_size
            if kind == FILE:
                file_type = mode & _S_IFMT
                if file_type == _S_IFREG:
                    fmt, i_u, size = _FORMAT_CHUNKED, chunked_i_u, node.size
                else:
                    fmt, size = _FORMAT_PLAIN, 0
                    i_u = node.rdev if (file_type == _S_IFCHR or file_type == _S_IFBLK) else 0
                nlink = nlink_of_group[id(node.link)] if node.link is not None else 1
            else:
                fmt = _FORMAT_INLINE if p.inline else _FORMAT_PLAIN
                i_u = (meta_addr + p.data_addr) // BLOCK_SIZE
                size = p.data_size
                if kind == DIR:
                    nlink = 2 + sum(1 for child in (node.children or {}).values() if child.children is not None)
                else:
                    nlink = nlink_of_group[id(node.link)] if node.link is not None else 1
            icount = 0 if xattr_size == 0 else (xattr_size - XATTR_IBODY_HEADER.size) // 4 + 1
            pack_inode(
                buf, pos, fmt, icount, mode & 0xFFFF, 0, size, i_u, p.ino, uid, gid, mtime, node.mtime_nsec, nlink,
                _EMPTY16,
            )
            if xattr_size:
                has_xattr = True
                _emit_xattrs(buf, pos + inode_base, node.xattrs)
            if kind == FILE:
                chunks = node.chunks
                if chunks:
                    index_pos = (pos + inode_base + xattr_size + 7) & -8
                    for blob_index, chunk_index, uoff, _, _, _, _, _ in chunks:  # ChunkRef fields
                        pack_index(
                            buf, index_pos, chunk_index & 0xFFFF,
                            ((blob_index + 1) & 0xFF) | (((chunk_index >> 16) & 0xFF) << 8), uoff // BLOCK_SIZE,
                        )
                        index_pos += 8
            elif kind == SYMLINK:
                _emit_data(buf, node.symlink or b"", meta_addr + p.data_addr, pos + inode_base + xattr_size, p.inline)
            else:
                _emit_dirents(buf, p, meta_addr + p.data_addr, pos + inode_base + xattr_size)
        relieve()
    return has_xattr


def _emit_data(buf: bytearray, data: bytes, data_pos: int, tail_pos: int, inline: bool) -> None:
    full = len(data) - len(data) % BLOCK_SIZE if inline else len(data)
    buf[data_pos:data_pos + full] = data[:full]
    if inline and full < len(data):
        buf[tail_pos:tail_pos + len(data) - full] = data[full:]


def _emit_dirents(buf: bytearray, placement: Placement, data_pos: int, tail_pos: int) -> None:
    """Blocks of [dirents][names]; the last partial block goes inline when `inline`."""
    names = placement.names or []
    directory, parent = placement.node, placement.parent
    children = directory.children or {}
    bounds: list[int] = [0]  # index of each block's first entry, then len(names)
    used = 0
    for number, name in enumerate(names):
        cost = DIRENT_SIZE + len(name)
        if used + cost > BLOCK_SIZE:
            bounds.append(number)
            used = 0
        used += cost
    bounds.append(len(names))
    pack_dirent = DIRENT.pack_into
    file_types = FILE_TYPE_BY_IFMT
    last = len(bounds) - 2
    for number in range(last + 1):
        block = names[bounds[number]:bounds[number + 1]]
        base = tail_pos if (placement.inline and number == last) else data_pos + BLOCK_SIZE * number
        nameoff = DIRENT_SIZE * len(block)
        names_at = base + nameoff
        for name in block:
            child = children[name] if name != b"." and name != b".." else (directory if name == b"." else parent)
            pack_dirent(buf, base, child.addr // 32, nameoff, file_types.get((child.mode >> 12) & 0o17, 0), 0)
            base += DIRENT_SIZE
            nameoff += len(name)
        joined = b"".join(block)
        buf[names_at:names_at + len(joined)] = joined

"""eStargz TOC → RAFS tree with nydus-image v2.1 semantics plus stargzfs's decisions
(rafs-v6 §1 and §11.2).

Deviations from v2.1, on purpose: char/block/fifo kept; root mode from the TOC root entry
(0755 without one); `stargz.index.json` and the landmarks hidden at the root; modtime kept;
xattrs sorted; hardlinks take the target's inode *and* xattrs. TOCs nydusd could not serve
(other chunkings, innerOffset, out-of-order members, too many chunks) are rejected.
"""

from __future__ import annotations

import hashlib
import stat
import struct
from dataclasses import dataclass

from stargzfs.errors import FormatError, UnsupportedError
from stargzfs.estargz.toc import HIDDEN_ROOT_NAMES, TYPE_BITS, Entry, Toc
from stargzfs.rafs.blobmeta import MAX_ENTRIES, blob_meta_header_for
from stargzfs.rafs.ondisk import BLOCK_SIZE, new_encode_dev, split_xattr_name
from stargzfs.rafs.tree import BlobInfo, ChunkRef, LinkGroup, Node, RafsImage

MAX_NAME_LEN = 255
MAX_COMPRESSED_OFFSET = (1 << 40) - 1  # blob.meta v1 comp_info bits
MAX_UNCOMPRESSED_END = 1 << 44  # blob.meta v1 uncomp_info bits / u32 blkaddr
MAX_XATTR_VALUE = 0xFFFF
_BLOCK_ID_FIELDS = struct.Struct("<QQQ")


@dataclass
class TocTree:
    image: RafsImage
    #: the chunk at each chunk index 0..n-1 (hardlink duplicates included, as v2.1 counts)
    index_records: list[ChunkRef]


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _encode_name(text: str, what: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"TOC {what} {text!r} is not valid UTF-8") from None
    if "\0" in text:
        raise FormatError(f"TOC {what} {text!r} contains a NUL byte")
    return raw


def _xattrs(entry: Entry) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    for key, value in entry.xattrs.items():
        name = _encode_name(key, f"xattr name of {entry.name!r}:")
        if split_xattr_name(name) is None:
            raise UnsupportedError(
                f"TOC entry {entry.name!r}: xattr {key!r} is not user.*, trusted.*, security.* or "
                "system.posix_acl_access/default"
            )
        if len(value) > MAX_XATTR_VALUE or len(name) > 255 + 9:
            raise UnsupportedError(f"TOC entry {entry.name!r}: xattr {key!r} is too large")
        out.append((name, value))
    out.sort()
    return out


def _block_id(blob_id: bytes, compressed_offset: int, uncompressed_offset: int, file_offset: int) -> bytes:
    """Unique per TOC data record; hardlink paths reuse it, as v2.1's serde-JSON ids do."""
    fields = _BLOCK_ID_FIELDS.pack(compressed_offset, uncompressed_offset, file_offset)
    return hashlib.sha256(b"stargzfs-chunk\0" + blob_id + b"\0" + fields).digest()


def _check_chunking(entry: Entry, chunk_size: int) -> None:
    chunks = sorted(entry.chunks, key=lambda c: c.chunk_offset)
    for number, chunk in enumerate(chunks):
        if chunk.inner_offset:
            raise UnsupportedError(
                f"TOC entry {entry.name!r}: innerOffset {chunk.inner_offset} (several files in one "
                "compressed member) cannot be served by RAFS v6"
            )
        expected_offset = number * chunk_size
        expected_size = min(chunk_size, entry.size - expected_offset)
        if chunk.chunk_offset != expected_offset or chunk.size != expected_size:
            raise UnsupportedError(
                f"TOC entry {entry.name!r}: chunk [{chunk.chunk_offset}, {chunk.chunk_offset + chunk.size}) "
                f"does not match --chunk-size {chunk_size:#x} (expected [{expected_offset}, "
                f"{expected_offset + expected_size}))"
            )
    if len(chunks) != -(-entry.size // chunk_size):
        raise UnsupportedError(
            f"TOC entry {entry.name!r}: {len(chunks)} chunks for {entry.size} bytes at --chunk-size {chunk_size:#x}"
        )


def build_tree(
    toc: Toc,
    *,
    blob_id: str,
    chunk_size: int = 0x400000,
    repeatable: bool = True,
    compressor: str = "gzip",
    blob_index: int = 0,
) -> TocTree:
    blob_id_bytes = blob_id.encode()
    # 1. Data records in TOC order: v2.1's virtual uncompressed blob (4 KiB aligned).
    refs_by_entry: dict[int, list[ChunkRef]] = {}
    next_uoff = 0
    last_coff = -1
    last_where = ""
    for entry in toc.entries:
        if not entry.chunks:
            continue
        _check_chunking(entry, chunk_size)
        refs: list[ChunkRef] = []
        for chunk in sorted(entry.chunks, key=lambda c: c.raw_index):
            if chunk.offset <= last_coff:
                raise UnsupportedError(
                    f"TOC entry {entry.name!r}: compressed offset {chunk.offset} is out of order "
                    f"(not after {last_coff} of {last_where!r})"
                )
            if chunk.offset > MAX_COMPRESSED_OFFSET:
                raise UnsupportedError(f"TOC entry {entry.name!r}: compressed offset {chunk.offset} exceeds 2^40")
            last_coff, last_where = chunk.offset, entry.name
            refs.append(
                ChunkRef(blob_index, -1, next_uoff, chunk.size, chunk.offset, 0, chunk.chunk_offset,
                         _block_id(blob_id_bytes, chunk.offset, next_uoff, chunk.chunk_offset))
            )
            next_uoff += _round_up(chunk.size, BLOCK_SIZE)
        if next_uoff > MAX_UNCOMPRESSED_END:
            raise UnsupportedError(f"TOC: uncompressed layer data exceeds 2^44 bytes at {entry.name!r}")
        refs.sort(key=lambda r: r.file_offset)
        refs_by_entry[id(entry)] = refs

    # 2. Nodes in TOC order; later duplicates replace earlier ones and keep their children.
    root = Node(b"", stat.S_IFDIR | 0o755)
    nodes: dict[str, Node] = {"": root}
    hardlinks: dict[int, tuple[Node, str, str]] = {}  # id(node) → (node, own name, target name)

    def ensure_dir(path: str) -> Node:
        """The directory at `path`, creating missing ancestors (mode 0755) top-down."""
        missing: list[str] = []
        found = nodes.get(path)
        while found is None:
            missing.append(path)
            path = path.rpartition("/")[0]
            found = nodes.get(path)
        for name in reversed(missing):
            if found.children is None:
                break
            node = Node(_encode_name(name.rpartition("/")[2], "name"), stat.S_IFDIR | 0o755)
            found.children[node.name] = node
            nodes[name] = found = node
        if found.children is None:
            raise FormatError(f"TOC: {path!r} is used as a directory but is not one")
        return found

    for entry in toc.entries:
        name = entry.name
        if name in HIDDEN_ROOT_NAMES:
            continue
        uid, gid = (0, 0) if repeatable else (entry.uid, entry.gid)
        mode = TYPE_BITS[entry.type] | entry.mode
        if name == "":
            root.mode, root.uid, root.gid = mode, uid, gid
            root.mtime, root.mtime_nsec, root.xattrs = entry.mtime, entry.mtime_nsec, _xattrs(entry)
            continue
        parent_path, _, base = name.rpartition("/")
        raw_name = _encode_name(base, "name")
        if len(raw_name) > MAX_NAME_LEN:
            raise UnsupportedError(f"TOC entry {name!r}: file name longer than {MAX_NAME_LEN} bytes")
        parent = ensure_dir(parent_path)
        node = Node(raw_name, mode, uid=uid, gid=gid, mtime=entry.mtime, mtime_nsec=entry.mtime_nsec,
                    xattrs=_xattrs(entry))
        if entry.type == "reg":
            node.size = entry.size
            node.chunks = refs_by_entry.get(id(entry), [])
        elif entry.type == "symlink":
            node.symlink = _encode_name(entry.link_name, "symlink target of " + repr(name))
            node.size = len(node.symlink)
        elif entry.type in ("char", "block"):
            if entry.dev_major > 0xFFF or entry.dev_minor > 0xFFFFF:
                raise UnsupportedError(f"TOC entry {name!r}: device {entry.dev_major}:{entry.dev_minor} too large")
            node.rdev = new_encode_dev(entry.dev_major, entry.dev_minor)
        elif entry.type == "hardlink":
            hardlinks[id(node)] = (node, name, entry.link_name)
        existing = parent.children.get(raw_name)  # type: ignore[union-attr]
        if existing is not None:
            hardlinks.pop(id(existing), None)
            if existing.children and node.children is not None:
                node.children = existing.children
            elif existing.children:
                raise FormatError(f"TOC entry {name!r}: a non-directory replaces a non-empty directory")
        parent.children[raw_name] = node  # type: ignore[index]
        nodes[name] = node

    # 3. Hardlinks: follow chains to a real inode, then share it (attributes, xattrs, chunks).
    for node, name, target_name in hardlinks.values():
        seen = {name}
        target = nodes.get(target_name)
        while target is not None and id(target) in hardlinks:
            if target_name in seen:
                raise FormatError(f"TOC entry {name!r}: hardlink loop through {target_name!r}")
            seen.add(target_name)
            target_name = hardlinks[id(target)][2]
            target = nodes.get(target_name)
        if target is None:
            raise FormatError(f"TOC entry {name!r}: hardlink target {target_name!r} does not exist")
        if target.children is not None:
            raise FormatError(f"TOC entry {name!r}: hardlink target {target_name!r} is a directory")
        if target.link is None:
            target.link = LinkGroup()
        node.copy_attributes_from(target)
        node.link = target.link

    # 4. Chunk indexes: every path's references, sorted by uncompressed offset (v2.1 §1.5);
    #    each record gets the last index of its run of duplicates.
    reference_counts: dict[int, int] = {}
    chunk_lists: dict[int, list[ChunkRef]] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node.children is not None:
            stack.extend(node.children.values())
        elif node.chunks:
            chunk_lists[id(node.chunks)] = node.chunks
            for ref in node.chunks:
                reference_counts[ref.uncompressed_offset] = reference_counts.get(ref.uncompressed_offset, 0) + 1
    offsets = sorted(reference_counts)
    last_index: dict[int, int] = {}
    total = 0
    for uoff in offsets:
        total += reference_counts[uoff]
        last_index[uoff] = total - 1
    if total > MAX_ENTRIES:
        raise UnsupportedError(f"TOC has {total} chunk references; blob.meta v1 holds at most {MAX_ENTRIES}")
    by_uoff: dict[int, ChunkRef] = {}
    for refs in chunk_lists.values():
        refs[:] = [ref._replace(chunk_index=last_index[ref.uncompressed_offset]) for ref in refs]
        for ref in refs:
            by_uoff[ref.uncompressed_offset] = ref
    index_records = [by_uoff[uoff] for uoff in offsets for _ in range(reference_counts[uoff])]

    blobs: list[BlobInfo] = []
    if index_records:
        last = by_uoff[offsets[-1]]
        header = blob_meta_header_for(total)
        blobs.append(
            BlobInfo(
                blob_id=blob_id,
                chunk_count=total,
                chunk_size=chunk_size,
                compressed_size=0,
                uncompressed_size=last.uncompressed_offset + last.uncompressed_size,
                compressor=compressor,
                digester="sha256",
                meta_features=header.features,
                ci_compressor=header.ci_compressor,
                ci_offset=header.ci_offset,
                ci_compressed_size=header.ci_compressed_size,
                ci_uncompressed_size=header.ci_uncompressed_size,
            )
        )
    image = RafsImage(
        root=root,
        blobs=blobs,
        chunk_size=chunk_size,
        compressor=compressor,
        digester="sha256",
        explicit_uid_gid=not repeatable,
    )
    return TocTree(image, index_records)

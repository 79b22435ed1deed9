"""eStargz TOC → RAFS tree with nydus-image v2.1 semantics plus stargzfs's decisions
(rafs-v6 §1 and §11.2).

Deviations from v2.1, on purpose: char/block/fifo kept; root mode from the TOC root entry
(0755 without one); `stargz.index.json` and the landmarks hidden at the root; modtime kept;
xattrs sorted; hardlinks take the target's inode *and* xattrs. TOCs nydusd could not serve
(other chunkings, innerOffset, out-of-order members, too many chunks) are rejected.
"""

from __future__ import annotations

import hashlib
import operator
import stat
import struct
from collections.abc import Callable
import msgspec

from stargzfs.errors import FormatError, UnsupportedError
from stargzfs.estargz.toc import HIDDEN_ROOT_NAMES, TYPE_BITS, EntryCore, Toc
from stargzfs.rafs.blobmeta import MAX_ENTRIES, blob_meta_header_for
from stargzfs.rafs.ondisk import BLOCK_SIZE, new_encode_dev, split_xattr_name
from stargzfs.rafs.tree import NO_CHUNKS, NO_XATTRS, BlobInfo, ChunkRef, LinkGroup, Node, RafsImage

MAX_NAME_LEN = 255
MAX_COMPRESSED_OFFSET = (1 << 40) - 1  # blob.meta v1 comp_info bits
MAX_UNCOMPRESSED_END = 1 << 44  # blob.meta v1 uncomp_info bits / u32 blkaddr
MAX_XATTR_VALUE = 0xFFFF
_BLOCK_ID_FIELDS = struct.Struct("<QQQ")
_CHUNK_INDEX_OF = operator.itemgetter(1)  # ChunkRef.chunk_index, without a Python call per ref


class TocTree(msgspec.Struct):
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


def _xattrs(entry: EntryCore) -> list[tuple[bytes, bytes]]:
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


def _block_id_hasher(blob_id: bytes) -> Callable[[int, int, int], bytes]:
    """Unique per TOC data record; hardlink paths reuse it, as v2.1's serde-JSON ids do.

    sha256 keeps the ids (and so the chunk-table order) identical to earlier builds; the
    common prefix is hashed once and copied per chunk.
    """
    prefix = hashlib.sha256(b"stargzfs-chunk\0" + blob_id + b"\0")
    pack = _BLOCK_ID_FIELDS.pack

    def block_id(compressed_offset: int, uncompressed_offset: int, file_offset: int) -> bytes:
        hasher = prefix.copy()
        hasher.update(pack(compressed_offset, uncompressed_offset, file_offset))
        return hasher.digest()

    return block_id


def _check_chunking(entry: EntryCore, chunk_size: int) -> None:
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


class _DataRecords:
    """Step 1, one entry at a time in TOC order: data records laid out in v2.1's virtual
    uncompressed blob (4 KiB aligned), compressed offsets checked to increase.

    Chunk indexes are provisional (creation order); `_assign_chunk_indexes` keeps them
    when every record is referenced exactly once, the usual case. Run inside the node loop
    so that a file's refs exist only once its entry is being turned into a node.
    """

    __slots__ = ("block_id", "chunk_size", "blob_index", "next_uoff", "last_coff", "last_where", "created")

    def __init__(self, blob_id: bytes, chunk_size: int, blob_index: int) -> None:
        self.block_id = _block_id_hasher(blob_id)
        self.chunk_size = chunk_size
        self.blob_index = blob_index
        self.next_uoff = 0
        self.last_coff = -1
        self.last_where = ""
        self.created = 0  # refs made so far

    def refs(self, entry: EntryCore) -> list[ChunkRef]:
        """The entry's refs in file order (it has chunks)."""
        chunks = entry.chunks
        if len(chunks) == 1:
            chunk = chunks[0]
            if chunk.inner_offset or chunk.chunk_offset or chunk.size != entry.size or entry.size > self.chunk_size:
                _check_chunking(entry, self.chunk_size)  # raises the precise error
        else:
            _check_chunking(entry, self.chunk_size)
            chunks = sorted(chunks, key=lambda c: c.raw_index)
        make_ref = tuple.__new__  # ChunkRef(...) costs twice as much; fields in ChunkRef order
        block_id, blob_index = self.block_id, self.blob_index
        next_uoff, last_coff, created = self.next_uoff, self.last_coff, self.created
        refs: list[ChunkRef] = []
        for chunk in chunks:
            offset = chunk.offset
            if offset <= last_coff:
                raise UnsupportedError(
                    f"TOC entry {entry.name!r}: compressed offset {offset} is out of order "
                    f"(not after {last_coff} of {self.last_where!r})"
                )
            if offset > MAX_COMPRESSED_OFFSET:
                raise UnsupportedError(f"TOC entry {entry.name!r}: compressed offset {offset} exceeds 2^40")
            last_coff = offset
            size = chunk.size
            refs.append(
                make_ref(ChunkRef, (blob_index, created, next_uoff, size, offset, 0, chunk.chunk_offset,
                                    block_id(offset, next_uoff, chunk.chunk_offset)))
            )
            created += 1
            next_uoff += (size + BLOCK_SIZE - 1) & -BLOCK_SIZE
        if next_uoff > MAX_UNCOMPRESSED_END:
            raise UnsupportedError(f"TOC: uncompressed layer data exceeds 2^44 bytes at {entry.name!r}")
        self.next_uoff, self.last_coff, self.created, self.last_where = next_uoff, last_coff, created, entry.name
        if len(refs) > 1:
            refs.sort(key=lambda r: r.file_offset)
            return refs
        return [refs[0]]  # an exact one-slot list, not append's four (16 B per file at 1M files)


def build_tree(
    toc: Toc,
    *,
    blob_id: str,
    chunk_size: int = 0x400000,
    repeatable: bool = True,
    compressor: str = "gzip",
    blob_index: int = 0,
    consume_toc: bool = False,
) -> TocTree:
    """`consume_toc=True` empties `toc.entries` while the nodes are made, so entries and
    tree never both exist in full (the builder's peak RSS); the caller must not use the
    Toc afterwards."""
    records = _DataRecords(blob_id.encode(), chunk_size, blob_index)
    if consume_toc:
        toc.forget_index()
    nodes = _PathNodes()
    with_chunks, replaced, hardlinks = _make_nodes(toc.entries, records, nodes, repeatable, consume_toc)
    hardlinks_with_chunks = _resolve_hardlinks(hardlinks, nodes)
    with_chunks += hardlinks_with_chunks
    root = nodes.root
    del nodes, hardlinks

    live = [node for node in with_chunks if id(node) not in replaced] if replaced else with_chunks
    del with_chunks
    # only hardlinks share a chunk list: without one to data, every list is one path's own
    index_records = _assign_chunk_indexes(live, records.created, lists_shared=bool(hardlinks_with_chunks))
    image = RafsImage(
        root=root,
        blobs=_blob_table(blob_id, index_records, chunk_size, compressor),
        chunk_size=chunk_size,
        compressor=compressor,
        digester="sha256",
        explicit_uid_gid=not repeatable,
    )
    return TocTree(image, index_records)


class _PathNodes:
    """Path → the directory now at that path, for the TOC's own directories and the parents
    they were looked up through. Files are found through their parents' `children` (only
    hardlink targets are looked up): a million-entry layer would otherwise keep a
    million-key dict and every entry's name string alive for the whole build.

    Implicit ancestors are reached through their parents' `children` instead of being
    registered under their full paths: a name of depth d would otherwise add d path
    strings of up to its own length, O(d²) bytes for one name (a 60,000-level name in a
    1 KB gzip TOC took 3.5 GiB).
    """

    __slots__ = ("root", "by_path")

    def __init__(self) -> None:
        self.root = Node.directory(b"", stat.S_IFDIR | 0o755)
        self.by_path: dict[str, Node] = {"": self.root}

    def directory(self, path: str) -> Node:
        """The directory at `path`, creating missing ones (mode 0755) on the way down."""
        node = self.by_path.get(path)
        if node is not None and node.children is not None:
            return node
        node = self.root
        parts = path.split("/")
        for depth, part in enumerate(parts):
            children = node.children
            if children is None:
                raise FormatError(f"TOC: {'/'.join(parts[:depth])!r} is used as a directory but is not one")
            raw = _component(part, path)
            child = children.get(raw)
            if child is None:
                child = children[raw] = Node.directory(raw, stat.S_IFDIR | 0o755)
            node = child
        if node.children is None:
            raise FormatError(f"TOC: {path!r} is used as a directory but is not one")
        self.by_path[path] = node
        return node

    def find(self, path: str) -> Node | None:
        """The node at `path`, if any (no directory is created)."""
        node = self.by_path.get(path)
        if node is not None:
            return node
        node = self.root
        for part in path.split("/"):
            children = node.children
            child = children.get(part.encode("utf-8", "surrogatepass")) if children is not None else None
            if child is None:
                return None
            node = child
        return node


def _component(base: str, path: str) -> bytes:
    """One path component as stored: UTF-8, no NUL, at most 255 bytes."""
    try:
        raw = base.encode()
    except UnicodeEncodeError:
        raw = _encode_name(base, "name")  # raises the precise error
    if "\0" in base:
        _encode_name(base, "name")
    if len(raw) > MAX_NAME_LEN:
        raise UnsupportedError(f"TOC entry {_shown(path)!r}: file name longer than {MAX_NAME_LEN} bytes")
    return raw


def _shown(name: str) -> str:
    return name if len(name) <= 100 else name[:100] + "…"


def _make_nodes(
    entries: list[EntryCore], records: _DataRecords, nodes: _PathNodes, repeatable: bool, consume: bool
) -> tuple[list[Node], set[int], dict[int, tuple[Node, str, str]]]:
    """Step 2: one node per entry in TOC order (with step 1 for its data); later duplicates
    replace earlier ones and keep their children. Returns the regular files owning data
    records (some replaced later), the id()s of the replaced ones, and the hardlinks
    (id → node, name, target)."""
    root = nodes.root
    by_path = nodes.by_path
    hardlinks: dict[int, tuple[Node, str, str]] = {}
    with_chunks: list[Node] = []
    replaced: set[int] = set()  # id() of nodes in with_chunks that a later duplicate replaced
    type_bits = TYPE_BITS
    hidden = HIDDEN_ROOT_NAMES
    modes: dict[int, int] = {}
    for position, entry in enumerate(entries):
        if consume:
            entries[position] = None  # type: ignore[call-overload]  # freed once this loop drops it
        refs = records.refs(entry) if entry.chunks else None  # hidden entries' data counts too (v2.1)
        name = entry.name
        if name in hidden:
            continue
        kind = entry.type
        uid, gid = (0, 0) if repeatable else (entry.uid, entry.gid)
        mode = type_bits[kind] | entry.mode
        mode = modes.setdefault(mode, mode)  # one int object per distinct mode, not per path
        xattrs = _xattrs(entry) if entry.xattrs else NO_XATTRS
        if not name:
            root.mode, root.uid, root.gid = mode, uid, gid
            root.mtime, root.mtime_nsec, root.xattrs = entry.mtime, entry.mtime_nsec, xattrs
            continue
        parent_path, _, base = name.rpartition("/")
        raw_name = _component(base, name)
        parent = by_path.get(parent_path)
        if parent is None or parent.children is None:
            parent = nodes.directory(parent_path)
        node = Node(raw_name, mode, uid, gid, entry.mtime, entry.mtime_nsec, 0, 0, None, xattrs, NO_CHUNKS,
                    {} if kind == "dir" else None)
        if kind == "reg":
            node.size = entry.size
            if refs is not None:
                node.chunks = refs
                with_chunks.append(node)
        elif kind != "dir":
            _special_file(node, entry, hardlinks)
        children = parent.children
        existing = children.get(raw_name)
        if existing is not None:
            hardlinks.pop(id(existing), None)
            if existing.chunks:  # in with_chunks, which keeps it alive: its id stays unique
                replaced.add(id(existing))
            if existing.children and node.children is not None:
                node.children = existing.children
            elif existing.children:
                raise FormatError(f"TOC entry {_shown(name)!r}: a non-directory replaces a non-empty directory")
        children[raw_name] = node
        if node.children is not None:
            by_path[name] = node
        elif existing is not None:
            by_path.pop(name, None)  # a directory no more: children must not land in it
    return with_chunks, replaced, hardlinks


def _special_file(node: Node, entry: EntryCore, hardlinks: dict[int, tuple[Node, str, str]]) -> None:
    """Symlink target, device number, or the hardlink to resolve once every path exists."""
    kind = entry.type
    if kind == "symlink":
        node.symlink = _encode_name(entry.link_name, "symlink target of " + repr(_shown(entry.name)))
        node.size = len(node.symlink)
    elif kind == "char" or kind == "block":
        if entry.dev_major > 0xFFF or entry.dev_minor > 0xFFFFF:
            raise UnsupportedError(
                f"TOC entry {_shown(entry.name)!r}: device {entry.dev_major}:{entry.dev_minor} too large"
            )
        node.rdev = new_encode_dev(entry.dev_major, entry.dev_minor)
    elif kind == "hardlink":
        hardlinks[id(node)] = (node, entry.name, entry.link_name)


def _resolve_hardlinks(hardlinks: dict[int, tuple[Node, str, str]], nodes: _PathNodes) -> list[Node]:
    """Step 3: follow chains to a real inode, then share it (attributes, xattrs, chunks).
    Returns the hardlink nodes that now own chunk references."""
    with_chunks: list[Node] = []
    for node, name, target_name in hardlinks.values():
        seen = {name}
        target = nodes.find(target_name)
        while target is not None and id(target) in hardlinks:
            if target_name in seen:
                raise FormatError(f"TOC entry {_shown(name)!r}: hardlink loop through {_shown(target_name)!r}")
            seen.add(target_name)
            target_name = hardlinks[id(target)][2]
            target = nodes.find(target_name)
        if target is None:
            raise FormatError(f"TOC entry {_shown(name)!r}: hardlink target {_shown(target_name)!r} does not exist")
        if target.children is not None:
            raise FormatError(f"TOC entry {_shown(name)!r}: hardlink target {_shown(target_name)!r} is a directory")
        if target.link is None:
            target.link = LinkGroup()
        node.copy_attributes_from(target)
        node.link = target.link
        if node.chunks:
            with_chunks.append(node)
    return with_chunks


def _blob_table(blob_id: str, index_records: list[ChunkRef], chunk_size: int, compressor: str) -> list[BlobInfo]:
    """The layer's one blob, or none when no file has data (v2.1 writes no blob then)."""
    if not index_records:
        return []
    last = index_records[-1]
    total = len(index_records)
    header = blob_meta_header_for(total)
    return [
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
    ]


def _assign_chunk_indexes(files: list[Node], created: int, *, lists_shared: bool = True) -> list[ChunkRef]:
    """Step 4: every path's references, sorted by uncompressed offset (v2.1 §1.5); each
    record gets the last index of its run of duplicates. Returns the record at each chunk
    index 0..n-1 (hardlink duplicates included, as v2.1 counts).

    Without hardlinks to data and without replaced duplicates, every record is referenced
    once and the provisional creation-order indexes already are the answer.
    `lists_shared=False` says no two paths share a chunk list (no hardlink has data): the
    per-list path counts, two id()-keyed dicts as large as the layer, are then skipped.
    """
    paths_of_list: dict[int, int] = {}  # id(chunk list) → number of paths sharing it
    lists: list[list[ChunkRef]]
    if lists_shared:
        by_id: dict[int, list[ChunkRef]] = {}
        for node in files:
            key = id(node.chunks)
            paths_of_list[key] = paths_of_list.get(key, 0) + 1
            by_id[key] = node.chunks  # type: ignore[assignment]  # files all have chunk lists
        lists = list(by_id.values())
        del by_id
        total = distinct = 0
        for refs in lists:
            total += len(refs) * paths_of_list[id(refs)]
            distinct += len(refs)
    else:
        lists = [node.chunks for node in files]  # type: ignore[misc]  # files all have chunk lists
        total = distinct = sum(map(len, lists))
    if total > MAX_ENTRIES:
        raise UnsupportedError(f"TOC has {total} chunk references; blob.meta v1 holds at most {MAX_ENTRIES}")
    if total == distinct == created:
        # every record alive and referenced once: indexes are creation order, which is
        # uncompressed-offset order
        by_index = [ref for refs in lists for ref in refs]
        by_index.sort(key=_CHUNK_INDEX_OF)
        return by_index
    if total == distinct:
        # referenced once each, but some records belong to no path (a hidden entry's data,
        # as ctr-remote's landmark file has, or a replaced duplicate): the index is the
        # record's rank in creation (= uncompressed-offset) order
        by_index = [ref for refs in lists for ref in refs]
        by_index.sort(key=_CHUNK_INDEX_OF)
        rank = {ref.chunk_index: index for index, ref in enumerate(by_index)}
        make_ref = tuple.__new__
        for refs in lists:
            refs[:] = [make_ref(ChunkRef, (ref[0], rank[ref[1]], *ref[2:])) for ref in refs]
        by_index = [ref for refs in lists for ref in refs]
        by_index.sort(key=_CHUNK_INDEX_OF)
        return by_index

    reference_counts: dict[int, int] = {}
    for refs in lists:
        count = paths_of_list[id(refs)]
        for ref in refs:
            reference_counts[ref.uncompressed_offset] = reference_counts.get(ref.uncompressed_offset, 0) + count
    offsets = sorted(reference_counts)
    last_index: dict[int, int] = {}
    running = 0
    for uoff in offsets:
        running += reference_counts[uoff]
        last_index[uoff] = running - 1
    by_uoff: dict[int, ChunkRef] = {}
    for refs in lists:
        refs[:] = [ref._replace(chunk_index=last_index[ref.uncompressed_offset]) for ref in refs]
        for ref in refs:
            by_uoff[ref.uncompressed_offset] = ref
    return [by_uoff[uoff] for uoff in offsets for _ in range(reference_counts[uoff])]

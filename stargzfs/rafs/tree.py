"""The in-memory filesystem tree every RAFS tool shares: built from a TOC, read from a
bootstrap, edited by merge, laid out by the writer.

Kept deliberately small (Structs, tuples, shared lists) so a million-entry layer fits in a
few hundred MiB. Hardlinks are separate `Node`s (one per path) that share one `LinkGroup`
object and the same attribute values, xattr list and chunk list; the writer emits one
inode per group.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from typing import NamedTuple

import msgspec


class LinkGroup:
    """Identity token: nodes holding the same LinkGroup object are one inode (hardlinks)."""

    __slots__ = ()


class ChunkRef(NamedTuple):
    """One chunk of a regular file, as both the chunk index and the chunk table see it."""

    blob_index: int
    chunk_index: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    compressed_size: int
    file_offset: int
    block_id: bytes  # 32 bytes; with blob_index the chunk table's unique key


#: Shared by every node without xattrs or chunks (never mutated: writers replace, not append).
NO_XATTRS: tuple[()] = ()
NO_CHUNKS: tuple[()] = ()


class Node(msgspec.Struct, gc=False, eq=False, repr_omit_defaults=True):
    """One path. `children` is a name→Node dict for directories and None otherwise.

    A msgspec Struct: made in C (a third of a Python __init__'s cost, once per path of a
    million-entry layer), no GC tracking (trees are acyclic), identity equality.
    Directories must be made with `children={}` (see `directory`).
    """

    name: bytes
    mode: int  # full st_mode: type bits | permission bits
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    rdev: int = 0  # Linux new_encode_dev form (char/block only)
    symlink: bytes | None = None
    xattrs: list[tuple[bytes, bytes]] | tuple[()] = NO_XATTRS  # sorted by name
    chunks: list[ChunkRef] | tuple[()] = NO_CHUNKS  # file order
    children: dict[bytes, Node] | None = None
    link: LinkGroup | None = None
    nid: int = 0  # set by the reader (source nid); informational only
    addr: int = 0  # set by the writer: this path's inode address in the image it last laid out

    @classmethod
    def directory(cls, name: bytes, mode: int) -> Node:
        """An empty directory; `mode` must carry S_IFDIR."""
        return cls(name, mode, children={})

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def copy_attributes_from(self, other: Node) -> None:
        """Make this path another name of `other`'s inode (shares lists, not copies)."""
        self.mode, self.uid, self.gid = other.mode, other.uid, other.gid
        self.mtime, self.mtime_nsec, self.size, self.rdev = other.mtime, other.mtime_nsec, other.size, other.rdev
        self.symlink, self.xattrs, self.chunks = other.symlink, other.xattrs, other.chunks

    def __repr__(self) -> str:
        return f"Node({self.name!r}, mode={self.mode:#o}, size={self.size})"


class BlobInfo(msgspec.Struct):
    """One blob-table entry (rafs-v6 §2.5) plus the blob.meta header fields it copies."""

    blob_id: str
    chunk_count: int
    chunk_size: int
    compressed_size: int = 0
    uncompressed_size: int = 0
    compressor: str = "gzip"
    digester: str = "sha256"
    meta_features: int = 1
    ci_compressor: int = 0
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0


class RafsImage(msgspec.Struct):
    """A whole bootstrap: tree + blob table + the superblock flags that are not derived."""

    root: Node
    blobs: list[BlobInfo] = msgspec.field(default_factory=list)
    chunk_size: int = 0x400000
    compressor: str = "gzip"
    digester: str = "sha256"
    explicit_uid_gid: bool = False
    #: set HAS_XATTR even without xattrs (merge does; a read-back keeps the source's flag)
    force_has_xattr: bool = False
    root_ino: int = 1

    def lookup(self, path: str | bytes) -> Node | None:
        """Absolute or relative path → node, following no symlinks."""
        raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
        node = self.root
        for part in raw.split(b"/"):
            if part in (b"", b"."):
                continue
            if node.children is None:
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """(path, node) depth-first, children in byte order; the root's path is b"/"."""
        stack: list[tuple[bytes, Node]] = [(b"/", self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                prefix = path if path.endswith(b"/") else path + b"/"
                for name in sorted(node.children, reverse=True):
                    stack.append((prefix + name, node.children[name]))

"""Where every inode and data block goes: the nydus-image v2.1 allocator (rafs-v6 §2.8).

Offsets here are relative to `meta_addr` (the writer adds it): the root inode lands at
4096, i.e. nid 128, exactly as v2.1 does. The pass is separate from byte emission because a
directory's dirents need the nids of child directories that are placed later.
"""

from __future__ import annotations

import stat
from collections import deque

import msgspec

from stargzfs.errors import UnsupportedError
from stargzfs.rafs.ondisk import (
    BLOCK_SIZE,
    DIRENT,
    INODE_EXTENDED,
    XATTR_IBODY_HEADER,
    split_xattr_name,
    xattr_entry_size,
)
from stargzfs.rafs.tree import Node

DIR, SYMLINK, FILE = 0, 1, 2  # placement kinds: dirent data, symlink data, chunk indexes/none
MAX_XATTR_SIZE = 0xFFFF * 4  # i_xattr_icount is a u16
_S_IFMT, _S_IFREG = 0o170000, stat.S_IFREG  # file-type mask, regular file


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def xattr_body_size(xattrs: list[tuple[bytes, bytes]]) -> int:
    if not xattrs:
        return 0
    size = XATTR_IBODY_HEADER.size
    for name, value in xattrs:
        split = split_xattr_name(name)
        if split is None:
            raise UnsupportedError(f"xattr name {name!r} is outside user./trusted./security./system.posix_acl_*")
        size += xattr_entry_size(len(split[1]), len(value))
    if size > MAX_XATTR_SIZE:
        raise UnsupportedError(f"xattrs of {size} bytes exceed the inline limit of {MAX_XATTR_SIZE}")
    return size


def dirent_size(names: list[bytes]) -> int:
    """Bytes of dirent data for sorted names: entries never straddle a 4 KiB block."""
    size = 0
    for name in names:
        cost = DIRENT.size + len(name)
        if size % BLOCK_SIZE + cost > BLOCK_SIZE:
            size = _round_up(size, BLOCK_SIZE)
        size += cost
    return size


class Placement(msgspec.Struct, gc=False):
    """One inode's place: `addr` (meta-relative, 32-aligned), `data_addr` = start of full
    dirent/symlink blocks, `inline` = tail stored after the inode. A Struct: one per inode,
    made in C."""

    node: Node
    kind: int
    addr: int
    ino: int
    xattr_size: int
    data_size: int = 0  # d_size for dirs, target length for symlinks
    data_addr: int = 0
    inline: bool = False
    names: list[bytes] | None = None  # a directory's dirent names, sorted, incl. "." and ".."
    parent: Node | None = None


class Layout(msgspec.Struct):
    """Every inode's place; each node's own inode address is left in `Node.addr` (hardlinks
    share it), which costs no per-node dict at a million inodes."""

    placements: list[Placement]
    nlink_of_group: dict[int, int]  # id(LinkGroup) → number of paths
    end: int  # first unused meta-relative byte
    inode_count: int  # number of paths (every tree node)


class _Allocator:
    """Bump pointer plus 128 FIFO lists of blocks with free tails (list k: ≥ 32·k bytes)."""

    def __init__(self) -> None:
        self.offset = BLOCK_SIZE
        self.free: list[deque[int]] = [deque() for _ in range(128)]
        self.mask = 0  # bit k set ⇔ free[k] non-empty

    def remember(self, off: int) -> None:
        rem = off % BLOCK_SIZE
        if rem:
            k = (BLOCK_SIZE - rem) // 32
            self.free[k].append(off - rem)
            self.mask |= 1 << k

    def take(self, size: int) -> int | None:
        if size >= BLOCK_SIZE:
            return None
        k0 = (size + 31) // 32
        rest = self.mask >> k0
        if not rest:
            return None
        k = k0 + (rest & -rest).bit_length() - 1
        queue = self.free[k]
        block = queue.popleft()
        if not queue:
            self.mask &= ~(1 << k)
        addr = block + BLOCK_SIZE - 32 * k
        self.remember(addr + 32 * k0)
        return addr

    def align(self, n: int) -> None:
        self.offset = _round_up(self.offset, n)

    def place_with_tail(self, inode_size: int, data_size: int) -> tuple[int, int, bool]:
        """Directory/symlink rule (§2.8 step 2) → (inode addr, data_addr, inline)."""
        tail = data_size % BLOCK_SIZE
        if tail and inode_size + tail <= BLOCK_SIZE:
            need = inode_size + tail
            addr = self.take(need)
            if addr is None:
                if BLOCK_SIZE - self.offset % BLOCK_SIZE < need:
                    self.remember(self.offset)
                    self.align(BLOCK_SIZE)
                addr = self.offset
                self.offset += need
            if data_size > tail:
                self.remember(self.offset)
                self.align(BLOCK_SIZE)
            data_addr = self.offset
            self.offset += data_size - tail
            return addr, data_addr, True
        addr = self.take(inode_size)
        if addr is None:
            addr = self.offset
            self.offset += inode_size
        self.remember(self.offset)
        self.align(BLOCK_SIZE)
        data_addr = self.offset
        self.offset += data_size
        self.align(BLOCK_SIZE)
        return addr, data_addr, False


def compute_layout(root: Node, *, chunk_size: int, root_ino: int = 1) -> Layout:
    layouter = _Layouter(root, chunk_size, root_ino)
    stack: list[tuple[Node, Node]] = [(root, root)]
    while stack:
        directory, parent = stack.pop()
        subdirs = layouter.place_directory(directory, parent)
        for sub in reversed(subdirs):
            stack.append((sub, directory))
    return Layout(layouter.placements, layouter.nlink_of_group, layouter.alloc.offset, layouter.inode_count)


class _Layouter:
    """The allocator plus what v2.1's depth-first pass carries from one directory to the next."""

    def __init__(self, root: Node, chunk_size: int, root_ino: int) -> None:
        self.alloc = _Allocator()
        self.chunk_size = chunk_size
        self.root_ino = root_ino
        self.placements: list[Placement] = []
        self.group_first: dict[int, tuple[int, int]] = {}  # id(group) → (ino, addr)
        self.nlink_of_group: dict[int, int] = {}
        self.ino_of: dict[int, int] = {id(root): root_ino}  # directories only
        self.next_ino = 1 if root_ino != 1 else 2
        self.inode_count = 1

    def place_directory(self, directory: Node, parent: Node) -> list[Node]:
        """The directory's inode and dirents, then its non-directory children; returns the
        child directories, which are placed later (depth first)."""
        alloc = self.alloc
        children = directory.children or {}
        names = sorted(children)
        dirent_names = [b".", b"..", *names]
        if names and names[0] < b"..":
            dirent_names.sort()
        d_size = dirent_size(dirent_names)
        xsize = xattr_body_size(directory.xattrs)
        addr, data_addr, inline = alloc.place_with_tail(INODE_EXTENDED.size + xsize, d_size)
        self.placements.append(
            Placement(directory, DIR, addr, self.ino_of[id(directory)], xsize, d_size, data_addr, inline,
                      dirent_names, parent)
        )
        directory.addr = addr
        alloc.align(32)
        self.inode_count += len(names)
        return self._place_children(children, names)

    def _place_children(self, children: dict[bytes, Node], names: list[bytes]) -> list[Node]:
        """The hot loop of a million-entry layer: everything it touches is a local."""
        alloc, chunk_size, root_ino, next_ino = self.alloc, self.chunk_size, self.root_ino, self.next_ino
        placements, group_first, nlink_of_group = self.placements, self.group_first, self.nlink_of_group
        subdirs: list[Node] = []
        for name in names:
            child = children[name]
            group = child.link if child.children is None else None
            if group is not None:
                nlink_of_group[id(group)] = nlink_of_group.get(id(group), 0) + 1
                first = group_first.get(id(group))
                if first is not None:
                    child.addr = first[1]
                    continue
            if next_ino == root_ino:
                next_ino += 1
            ino = next_ino
            next_ino += 1
            if child.children is not None:
                self.ino_of[id(child)] = ino
                subdirs.append(child)
                continue
            xsize = xattr_body_size(child.xattrs) if child.xattrs else 0
            if child.symlink is None:
                # regular files and devices: inode, 8-aligned chunk indexes, then align to 32;
                # the offset is 32-aligned here
                count = len(child.chunks)
                is_reg = (child.mode & _S_IFMT) == _S_IFREG
                if not count and not xsize and not alloc.mask:
                    caddr = alloc.offset
                    alloc.offset = caddr + INODE_EXTENDED.size
                    if is_reg and child.size:
                        raise UnsupportedError(f"{name!r}: {child.size} bytes but no chunks")
                else:
                    if is_reg and count != -(-child.size // chunk_size):
                        raise UnsupportedError(
                            f"{name!r}: {count} chunks for {child.size} bytes, need ceil(size/{chunk_size:#x})"
                        )
                    inode_end = (INODE_EXTENDED.size + xsize + 7) & -8
                    found = alloc.take(inode_end + 8 * count) if alloc.mask else None
                    if found is None:
                        caddr = alloc.offset
                        alloc.offset = (caddr + inode_end + 8 * count + 31) & -32
                    else:
                        caddr = found
                placements.append(Placement(child, FILE, caddr, ino, xsize))
            else:
                target_len = len(child.symlink)
                caddr, cdata, cinline = alloc.place_with_tail(INODE_EXTENDED.size + xsize, target_len)
                placements.append(Placement(child, SYMLINK, caddr, ino, xsize, target_len, cdata, cinline))
                alloc.align(32)
            child.addr = caddr
            if group is not None:
                group_first[id(group)] = (ino, caddr)
        self.next_ino = next_ino
        return subdirs

"""The inode table: FUSE inode numbers <-> O_PATH file descriptors.

Every real inode the kernel knows about is pinned by one O_PATH|O_NOFOLLOW fd, the way
libfuse's passthrough_ll does it, so later requests never resolve a path string: a rename
or a planted symlink between two requests cannot redirect them. While the kernel holds an
inode, each (st_dev, st_ino) has one number (hard links share it); once the kernel forgets
it, so does the table, so a walk over a million files does not leave a million entries
behind. Numbers are never reused during a mount (a later lookup gets a fresh one).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ROOT_NUMBER = 1

RealKey = tuple[int, int]
PlaceholderKey = tuple[str, int, int, str]
VirtualKey = tuple[str, str]


@dataclass(eq=False)
class Inode:
    """One kernel-visible inode; `fd` is None for MNT/ itself and for placeholders."""

    number: int
    fd: int | None = None
    is_symlink: bool = False
    top: str | None = None  # set when this inode is MNT/<top> itself
    placeholder: tuple[str, str] | None = None  # (top, name) of a listed-but-missing file
    lazy: str | None = None  # "" for the lazy-files dir, else the name of a lazy file in it
    lookups: int = 0
    key: RealKey | PlaceholderKey | VirtualKey | None = field(default=None, repr=False)

    @property
    def proc_path(self) -> str:
        """Magic-link path that re-opens exactly this inode, never a path lookup."""
        assert self.fd is not None
        return f"/proc/self/fd/{self.fd}"


class InodeTable:
    """Live inodes by number; the fd is closed when the kernel's lookup count drops to 0."""

    def __init__(self) -> None:
        self.root = Inode(number=ROOT_NUMBER, lookups=1)
        self._live: dict[int, Inode] = {ROOT_NUMBER: self.root}
        self._by_key: dict[object, Inode] = {}
        self._next_number = ROOT_NUMBER + 1
        self._tops: dict[str, Inode] = {}

    def __len__(self) -> int:
        return len(self._live)

    def get(self, number: int) -> Inode | None:
        return self._live.get(number)

    @property
    def known_keys(self) -> int:
        """How many (device, inode) / placeholder keys the table maps (bounded by live inodes)."""
        return len(self._by_key)

    def _new_number(self) -> int:
        number = self._next_number
        self._next_number += 1
        return number

    def adopt(self, fd: int, st: os.stat_result) -> Inode:
        """Return the inode for an O_PATH fd; takes ownership of `fd` (closed if a duplicate).

        The lookup count is NOT raised: call `ref` once the kernel has accepted the entry.
        """
        key: RealKey = (st.st_dev, st.st_ino)
        existing = self._by_key.get(key)
        if existing is not None:
            os.close(fd)
            return existing
        inode = Inode(
            number=self._new_number(),
            fd=fd,
            is_symlink=(st.st_mode & 0o170000) == 0o120000,
            key=key,
        )
        self._live[inode.number] = inode
        self._by_key[key] = inode
        return inode

    def placeholder(self, parent: Inode, top: str, name: str) -> Inode:
        """Inode for a name the provider lists before it exists (never has an fd)."""
        assert parent.key is not None
        key: PlaceholderKey = ("placeholder", parent.key[0], parent.key[1], name)  # type: ignore[index]
        existing = self._by_key.get(key)
        if existing is not None:
            return existing
        inode = Inode(number=self._new_number(), placeholder=(top, name), key=key)
        self._live[inode.number] = inode
        self._by_key[key] = inode
        return inode

    def lazy(self, name: str) -> Inode:
        """Inode of the provider's lazy-files dir (`name` "") or of one lazy file in it."""
        key: VirtualKey = ("lazy", name)
        existing = self._by_key.get(key)
        if existing is not None:
            return existing
        inode = Inode(number=self._new_number(), lazy=name, key=key)
        self._live[inode.number] = inode
        self._by_key[key] = inode
        return inode

    def promote(self, inode: Inode, fd: int, st: os.stat_result) -> None:
        """Bind a placeholder to the file now created under its name; takes ownership of `fd`.

        The kernel keeps using the placeholder's number for that name, so from now on the
        number stands for the real file: later lookups of the file return this same inode
        unless another inode already represents it (then this one just reads through `fd`).
        """
        if inode.fd is not None or self._live.get(inode.number) is not inode:
            os.close(fd)  # promoted by a concurrent request, or forgotten meanwhile
            return
        inode.fd = fd
        inode.is_symlink = (st.st_mode & 0o170000) == 0o120000
        inode.placeholder = None
        if inode.key is not None and self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]  # a later placeholder of that name gets a fresh number
        key: RealKey = (st.st_dev, st.st_ino)
        if key in self._by_key:
            inode.key = None
            return
        inode.key = key
        self._by_key[key] = inode

    def ref(self, inode: Inode) -> None:
        inode.lookups += 1

    def drop_if_unused(self, inode: Inode) -> None:
        """Release an inode adopted for a reply the kernel did not take."""
        if inode.lookups <= 0:
            self._release(inode)

    def forget(self, number: int, count: int) -> None:
        inode = self._live.get(number)
        if inode is None or inode is self.root:
            return
        inode.lookups -= count
        if inode.lookups <= 0:
            self._release(inode)

    def mark_top(self, inode: Inode, top: str) -> None:
        """Remember that `inode` is MNT/<top>; hidden and virtual names apply inside it."""
        inode.top = top
        self._tops[top] = inode

    def find_top(self, top: str) -> Inode | None:
        return self._tops.get(top)

    def _release(self, inode: Inode) -> None:
        self._live.pop(inode.number, None)
        if inode.top is not None and self._tops.get(inode.top) is inode:
            del self._tops[inode.top]
        if inode.key is not None and self._by_key.get(inode.key) is inode:
            del self._by_key[inode.key]
        if inode.fd is not None:
            try:
                os.close(inode.fd)
            except OSError as exc:  # pragma: no cover - would be a bookkeeping bug
                log.warning("closing fd of inode %d: %s", inode.number, exc)
            inode.fd = None

    def close_all(self) -> None:
        for inode in list(self._live.values()):
            if inode is not self.root:
                self._release(inode)

"""pyfuse3 Operations: MNT/ lists the provider's top dirs, MNT/<top>/ passes through.

Passthrough model (libfuse passthrough_ll): every inode holds an O_PATH|O_NOFOLLOW fd;
names are resolved one component at a time with openat() relative to the parent's fd;
attributes come from fstat() on that fd; files are opened by re-opening
/proc/self/fd/<fd>. No request ever resolves a multi-component path from ROOT, so symlinks
and renames inside the real dirs cannot make the daemon read or write outside ROOT.

Names the provider lists before they exist are placeholder inodes (no fd): a lookup
answers at once, and the first GETATTR/OPEN/SETATTR waits for provider.materialize and
then binds the placeholder to the new file, so a conversion never holds the kernel's
per-directory lookup/readdir lock.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import pyfuse3
import trio

from stargzfs.fdpath import open_dir_beneath, renameat2
from stargzfs.fuse.inodes import ROOT_NUMBER, Inode, InodeTable
from stargzfs.fuse.provider import LazyFiles, Provider

log = logging.getLogger(__name__)

_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_LOOKUP_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_STRIP_ON_OPEN = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _errno_boundary(handler: F) -> F:
    """Only FUSEError may leave a handler: OSError keeps its errno, anything else is EIO."""

    @functools.wraps(handler)
    async def wrapper(self: "PassthroughOperations", *args: Any) -> Any:
        if self.after_init is not None:
            hook, self.after_init = self.after_init, None
            hook()  # the kernel only sends requests once it has processed FUSE_INIT
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception as exc:  # noqa: BLE001 - the kernel must get an answer
            log.error("%s: unexpected %s: %s", handler.__name__, type(exc).__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@dataclass
class _DirHandle:
    """A snapshot of one directory's names taken at opendir: offsets stay stable."""

    inode: Inode
    names: list[str]
    virtual: frozenset[str] = frozenset()
    tops: Mapping[str, Path] = field(default_factory=dict)


class PassthroughOperations(pyfuse3.Operations):
    """The FUSE request handlers; `provider` decides what MNT/ shows."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(
        self,
        provider: Provider,
        *,
        writable: bool = False,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
    ) -> None:
        super().__init__()
        self.provider = provider
        self.writable = writable
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.inodes = InodeTable()
        # ROOT itself is the trust anchor and may be reached through symlinks; below it
        # every component is opened with O_NOFOLLOW.
        self._root_path = Path(provider.root)
        self._root_fd = os.open(self._root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._root_stat = os.fstat(self._root_fd)
        self._started_ns = time.time_ns()
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir_handle = 1
        self._known_tops: set[str] = set()
        self._lazy: LazyFiles | None = provider if hasattr(provider, "lazy_files") else None  # type: ignore[assignment]
        self._lazy_handles: dict[int, str] = {}
        self._next_lazy_handle = 1 << 40  # never an fd number
        self._nursery: trio.Nursery | None = None
        self._kernel_notifications = False
        # Run once, on the first request: settings the kernel resets while handling
        # FUSE_INIT (e.g. the bdi readahead) must be applied after it.
        self.after_init: Callable[[], None] | None = None

    # ----------------------------------------------------------------- lifecycle
    def attach(self, nursery: trio.Nursery) -> None:
        """Run materialize() in tasks of this nursery and start talking back to the kernel."""
        self._nursery = nursery
        self._kernel_notifications = True
        bind = getattr(self.provider, "bind_notifier", None)
        if bind is not None:
            bind(self)
        bind_nursery = getattr(self.provider, "bind_nursery", None)
        if bind_nursery is not None:
            bind_nursery(nursery)  # background work of the provider's own (prefetch) runs here

    def close(self) -> None:
        self.inodes.close_all()
        for handle in list(self._dirs):
            self._dirs.pop(handle, None)
        os.close(self._root_fd)

    def notify_changed(self, top: str, name: str) -> None:
        """Forget cached entry/attrs for MNT/<top>/<name> (files the daemon created itself)."""
        if not self._kernel_notifications:
            return
        parent = self.inodes.find_top(top)
        if parent is None:
            return
        pyfuse3.invalidate_entry_async(parent.number, os.fsencode(name), ignore_enoent=True)
        self._invalidate_attrs(parent)

    def _invalidate_attrs(self, inode: Inode) -> None:
        if not self._kernel_notifications:
            return
        try:
            pyfuse3.invalidate_inode(inode.number, attr_only=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.debug("invalidate inode %d: %s", inode.number, exc)

    # ----------------------------------------------------------------- helpers
    def _inode(self, number: int) -> Inode:
        inode = self.inodes.get(number)
        if inode is None:
            raise _fail(errno.ESTALE)
        return inode

    def _real(self, number: int) -> Inode:
        inode = self._inode(number)
        if inode.fd is None:
            # MNT/ and placeholders have no backing file to act on.
            raise _fail(errno.EROFS if inode.number == ROOT_NUMBER else errno.ENOENT)
        return inode

    def _writable_dir(self, number: int) -> Inode:
        if number == ROOT_NUMBER or not self.writable:
            raise _fail(errno.EROFS)
        return self._real(number)

    def _require_writable(self) -> None:
        if not self.writable:
            raise _fail(errno.EROFS)

    def _attrs(
        self, number: int, st: os.stat_result, entry_timeout: float, attr_timeout: float
    ) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = number
        attrs.generation = 0
        attrs.entry_timeout = entry_timeout
        attrs.attr_timeout = attr_timeout
        attrs.st_mode = st.st_mode
        attrs.st_nlink = st.st_nlink
        attrs.st_uid = st.st_uid
        attrs.st_gid = st.st_gid
        attrs.st_rdev = st.st_rdev
        attrs.st_size = st.st_size
        attrs.st_blksize = st.st_blksize
        attrs.st_blocks = st.st_blocks
        attrs.st_atime_ns = st.st_atime_ns
        attrs.st_mtime_ns = st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    def _real_attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        assert inode.fd is not None
        return self._attrs(inode.number, os.fstat(inode.fd), self.entry_timeout, self.attr_timeout)

    def _synthetic_attrs(
        self, number: int, mode: int, *, size: int = 0, timeouts: tuple[float, float] | None = None
    ) -> pyfuse3.EntryAttributes:
        """An inode no real file stands behind (MNT/, placeholders, lazy files): owned like ROOT,
        dated from the mount's start."""
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = number
        attrs.entry_timeout, attrs.attr_timeout = timeouts or (self.entry_timeout, self.attr_timeout)
        attrs.st_mode = mode
        attrs.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attrs.st_size = size
        attrs.st_blocks = (size + 511) // 512
        attrs.st_uid = self._root_stat.st_uid
        attrs.st_gid = self._root_stat.st_gid
        attrs.st_blksize = 1 << 20 if size else 4096
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self._started_ns
        return attrs

    def _root_attrs(self) -> pyfuse3.EntryAttributes:
        # attr timeout 0: the listing changes with the snapshot store
        return self._synthetic_attrs(ROOT_NUMBER, stat.S_IFDIR | 0o555, timeouts=(self.entry_timeout, 0))

    def _placeholder_attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """A listed-but-missing file: zero timeouts so every access comes back to us (see _backed)."""
        return self._synthetic_attrs(inode.number, stat.S_IFREG | 0o440, timeouts=(0, 0))

    def _lazy_attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """The lazy-files dir (read-only) or one of its files, whose size the provider knows."""
        assert self._lazy is not None and inode.lazy is not None
        if inode.lazy == "":
            return self._synthetic_attrs(inode.number, stat.S_IFDIR | 0o555)
        size = self._lazy.lazy_files().get(inode.lazy)
        if size is None:
            raise _fail(errno.ENOENT)
        return self._synthetic_attrs(inode.number, stat.S_IFREG | 0o444, size=size)

    def _lookup_lazy(self, name: str) -> pyfuse3.EntryAttributes:
        """MNT/<lazy dir>/<name>: a lazy file while the provider offers it."""
        assert self._lazy is not None
        if name not in self._lazy.lazy_files():
            raise _fail(errno.ENOENT)
        inode = self.inodes.lazy(name)
        attrs = self._lazy_attrs(inode)
        self.inodes.ref(inode)
        return attrs

    def _entry(self, fd: int) -> tuple[Inode, pyfuse3.EntryAttributes]:
        """Adopt a fresh O_PATH fd (ownership passes to the table) and describe it."""
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self.inodes.adopt(fd, st)
        return inode, self._attrs(inode.number, st, self.entry_timeout, self.attr_timeout)

    def _open_top(self, path: Path) -> int:
        """O_PATH fd of a top dir, walking down from ROOT without following any symlink."""
        try:
            relative = PurePosixPath(path).relative_to(self._root_path)
        except ValueError:
            log.warning("provider returned a dir outside ROOT; ignored: %s", path)
            raise _fail(errno.ENOENT) from None
        parts = relative.parts
        if any(part in ("", ".", "..") for part in parts):
            log.warning("provider returned a non-canonical dir; ignored: %s", path)
            raise _fail(errno.ENOENT)
        try:
            return open_dir_beneath(self._root_fd, parts)
        except NotADirectoryError as exc:
            log.warning("not serving %s: %s", path, exc.strerror)
            raise _fail(errno.ENOENT) from None

    def _top_dirs(self) -> Mapping[str, Path]:
        tops = self.provider.top_dirs()
        gone = self._known_tops - tops.keys()
        self._known_tops = set(tops)
        if gone and self._kernel_notifications:
            for name in gone:
                pyfuse3.invalidate_entry_async(ROOT_NUMBER, os.fsencode(name), ignore_enoent=True)
        return tops

    def _lookup_top(self, name: str, tops: Mapping[str, Path]) -> tuple[Inode, pyfuse3.EntryAttributes]:
        path = tops.get(name)
        if path is None:
            raise _fail(errno.ENOENT)
        inode, attrs = self._entry(self._open_top(path))
        self.inodes.mark_top(inode, name)
        return inode, attrs

    async def _materialize(self, parent: Inode, top: str, name: str) -> None:
        """Await provider.materialize in a task of its own (never cancelled by the waiting request)."""
        if self._nursery is None:
            await self.provider.materialize(top, name)
        else:
            done = trio.Event()
            outcome: list[BaseException] = []

            async def run() -> None:
                try:
                    await self.provider.materialize(top, name)
                except Exception as exc:  # noqa: BLE001 - handed to the waiting request
                    outcome.append(exc)
                finally:
                    done.set()

            self._nursery.start_soon(run, name=f"materialize {top}/{name}")
            await done.wait()
            if outcome:
                raise outcome[0]
        self._invalidate_attrs(parent)

    async def _backed(self, node: Inode) -> Inode:
        """`node` with a real file behind it: a placeholder waits here for its conversion.

        Only requests on the placeholder inode itself (GETATTR, OPEN, SETATTR) wait, never
        a LOOKUP: the kernel runs LOOKUP and READDIR of a directory under that directory's
        lock (libfuse 3.14 cannot negotiate FUSE_PARALLEL_DIROPS) and READDIRPLUS also
        waits for any name still being looked up, so a lookup awaiting a conversion would
        stall every new name and every listing in MNT/<top>/.
        """
        if node.fd is not None or node.placeholder is None:
            return node
        top, name = node.placeholder
        parent = self.inodes.find_top(top)
        if parent is None or parent.fd is None:
            raise _fail(errno.ESTALE)
        await self._materialize(parent, top, name)
        fd = os.open(name, _LOOKUP_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.inodes.promote(node, fd, st)
        if node.fd is None:
            raise _fail(errno.ESTALE)  # the kernel forgot the placeholder meanwhile
        return node

    # ----------------------------------------------------------------- lookups
    @_errno_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if name in (b".", b"..") or b"/" in name:
            raise _fail(errno.ENOENT)
        parent = self._inode(parent_inode)
        text = os.fsdecode(name)
        if parent.number == ROOT_NUMBER:
            if self._lazy is not None and text == self._lazy.lazy_dir:
                lazy_dir = self.inodes.lazy("")
                self.inodes.ref(lazy_dir)
                return self._lazy_attrs(lazy_dir)
            inode, attrs = self._lookup_top(text, self._top_dirs())
            self.inodes.ref(inode)
            return attrs
        if parent.lazy == "":
            return self._lookup_lazy(text)
        if parent.fd is None:
            raise _fail(errno.ENOTDIR)
        top = parent.top
        if top is not None and self.provider.is_hidden(top, text):
            raise _fail(errno.ENOENT)
        try:
            fd = os.open(name, _LOOKUP_FLAGS, dir_fd=parent.fd)
        except FileNotFoundError:
            if top is None or text not in self.provider.virtual_names(top):
                raise
            # Answer at once; the first GETATTR/OPEN of it waits for the conversion (_backed).
            placeholder = self.inodes.placeholder(parent, top, text)
            self.inodes.ref(placeholder)
            return self._placeholder_attrs(placeholder)
        inode, attrs = self._entry(fd)
        self.inodes.ref(inode)
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for number, count in inode_list:
            try:
                self.inodes.forget(number, count)
            except Exception as exc:  # noqa: BLE001 - forget must not raise
                log.error("forget %d: %s", number, exc)

    @_errno_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        if node.number == ROOT_NUMBER:
            return self._root_attrs()
        if node.lazy is not None:
            return self._lazy_attrs(node)
        return self._real_attrs(await self._backed(node))

    @_errno_boundary
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        node = self._real(inode)
        return os.fsencode(os.readlink("", dir_fd=node.fd))

    # ----------------------------------------------------------------- directories
    @_errno_boundary
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        node = self._inode(inode)
        if node.number == ROOT_NUMBER:
            tops = dict(self._top_dirs())
            handle = _DirHandle(node, sorted(tops), tops=tops)
        elif node.lazy == "" and self._lazy is not None:
            handle = _DirHandle(node, sorted(self._lazy.lazy_files()))
        else:
            if node.fd is None:
                raise _fail(errno.ENOTDIR)
            listing_fd = os.open(node.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                names = os.listdir(listing_fd)
            finally:
                os.close(listing_fd)
            virtual: frozenset[str] = frozenset()
            if node.top is not None:
                top = node.top
                names = [n for n in names if not self.provider.is_hidden(top, n)]
                present = set(names)
                virtual = frozenset(
                    n for n in self.provider.virtual_names(top) if n not in present
                )
                names.extend(sorted(virtual))
            handle = _DirHandle(node, names, virtual=virtual)
        number = self._next_dir_handle
        self._next_dir_handle += 1
        self._dirs[number] = handle
        return number

    def _dir_entry(self, handle: _DirHandle, name: str) -> tuple[Inode, pyfuse3.EntryAttributes] | None:
        """Attributes for one listed name, or None if it vanished since opendir."""
        if handle.inode.number == ROOT_NUMBER:
            try:
                inode, attrs = self._lookup_top(name, handle.tops)
            except (OSError, pyfuse3.FUSEError):
                return None
            return inode, attrs
        parent = handle.inode
        if parent.lazy == "":
            lazy = self.inodes.lazy(name)
            try:
                return lazy, self._lazy_attrs(lazy)
            except pyfuse3.FUSEError:
                self.inodes.drop_if_unused(lazy)
                return None  # gone since opendir
        if parent.fd is None:
            return None
        try:
            fd = os.open(name, _LOOKUP_FLAGS, dir_fd=parent.fd)
        except FileNotFoundError:
            if name in handle.virtual and parent.top is not None:
                inode = self.inodes.placeholder(parent, parent.top, name)
                return inode, self._placeholder_attrs(inode)
            return None
        return self._entry(fd)

    @_errno_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._dirs.get(fh)
        if handle is None:
            raise _fail(errno.EBADF)
        names = handle.names
        for index in range(start_id, len(names)):
            name = names[index]
            found = self._dir_entry(handle, name)
            if found is None:
                continue
            inode, attrs = found
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                self.inodes.drop_if_unused(inode)
                return
            self.inodes.ref(inode)

    @_errno_boundary
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_errno_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._dirs.get(fh)
        if handle is None or handle.inode.fd is None:
            return
        fd = os.open(handle.inode.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- files
    @_errno_boundary
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if node.lazy is not None:
            return await self._open_lazy(node, flags)
        if flags & _WRITE_FLAGS and not self.writable:
            raise _fail(errno.EROFS)
        node = await self._backed(node)
        if node.fd is None:
            raise _fail(errno.EISDIR)
        fd = os.open(node.proc_path, (flags & ~_STRIP_ON_OPEN) | os.O_CLOEXEC)
        return pyfuse3.FileInfo(fh=fd)

    async def _open_lazy(self, node: Inode, flags: int) -> pyfuse3.FileInfo:
        assert self._lazy is not None and node.lazy is not None
        if node.lazy == "":
            raise _fail(errno.EISDIR)
        if flags & _WRITE_FLAGS:
            raise _fail(errno.EROFS)  # provider-made bytes, even on a --rw mount
        await self._lazy.open_lazy(node.lazy)
        handle = self._next_lazy_handle
        self._next_lazy_handle += 1
        self._lazy_handles[handle] = node.lazy
        # the bytes of a name never change while it exists: keep the kernel's pages across opens
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @_errno_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        lazy = self._lazy_handles.get(fh)
        if lazy is not None:
            assert self._lazy is not None
            return await self._lazy.read_lazy(lazy, off, size)
        return os.pread(fh, size, off)

    @_errno_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._require_writable()
        return os.pwrite(fh, buf, off)

    @_errno_boundary
    async def flush(self, fh: int) -> None:
        return None

    @_errno_boundary
    async def release(self, fh: int) -> None:
        if self._lazy_handles.pop(fh, None) is None:
            os.close(fh)

    @_errno_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        if fh in self._lazy_handles:
            return
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    @_errno_boundary
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self._root_fd)
        data = pyfuse3.StatvfsData()
        data.f_bsize = sv.f_bsize
        data.f_frsize = sv.f_frsize
        data.f_blocks = sv.f_blocks
        data.f_bfree = sv.f_bfree
        data.f_bavail = sv.f_bavail
        data.f_files = sv.f_files
        data.f_ffree = sv.f_ffree
        data.f_favail = sv.f_favail
        data.f_namemax = sv.f_namemax
        return data

    # ----------------------------------------------------------------- xattrs
    def _xattr_target(self, inode: int) -> Inode | None:
        """The inode to act on, or None when it has no xattrs we can reach race-free."""
        node = self._inode(inode)
        if node.fd is None or node.is_symlink:
            return None
        return node

    @_errno_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        node = self._xattr_target(inode)
        if node is None:
            raise _fail(pyfuse3.ENOATTR)
        return os.getxattr(node.proc_path, name)

    @_errno_boundary
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        node = self._xattr_target(inode)
        if node is None:
            return []
        return [os.fsencode(n) for n in os.listxattr(node.proc_path)]

    @_errno_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        self._require_writable()
        node = self._xattr_target(inode)
        if node is None:
            raise _fail(errno.EPERM)
        os.setxattr(node.proc_path, name, value)

    @_errno_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: Any = None) -> None:
        self._require_writable()
        node = self._xattr_target(inode)
        if node is None:
            raise _fail(errno.EPERM)
        os.removexattr(node.proc_path, name)

    # ----------------------------------------------------------------- writes (--rw)
    def _check_new_name(self, parent: Inode, name: bytes) -> None:
        if name in (b".", b"..") or b"/" in name:
            raise _fail(errno.EINVAL)
        if parent.top is not None and self.provider.is_hidden(parent.top, os.fsdecode(name)):
            raise _fail(errno.EPERM)

    def _give_to_caller(self, parent: Inode, name: bytes, ctx: Any) -> None:
        """New entries belong to the calling user, as if they had created them directly."""
        if ctx is None or os.geteuid() != 0:
            return
        os.chown(name, ctx.uid, ctx.gid, dir_fd=parent.fd, follow_symlinks=False)

    def _lookup_created(self, parent: Inode, name: bytes) -> pyfuse3.EntryAttributes:
        inode, attrs = self._entry(os.open(name, _LOOKUP_FLAGS, dir_fd=parent.fd))
        self.inodes.ref(inode)
        return attrs

    @_errno_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any = None
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._writable_dir(parent_inode)
        self._check_new_name(parent, name)
        open_flags = (flags & ~os.O_NOCTTY) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, open_flags, mode & 0o7777, dir_fd=parent.fd)
        try:
            if ctx is not None and os.geteuid() == 0:
                os.fchown(fd, ctx.uid, ctx.gid)
            path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
            inode, attrs = self._entry(path_fd)
        except BaseException:
            os.close(fd)
            raise
        self.inodes.ref(inode)
        return pyfuse3.FileInfo(fh=fd), attrs

    @_errno_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._writable_dir(parent_inode)
        self._check_new_name(parent, name)
        os.mkdir(name, mode & 0o7777, dir_fd=parent.fd)
        self._give_to_caller(parent, name, ctx)
        return self._lookup_created(parent, name)

    @_errno_boundary
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._writable_dir(parent_inode)
        self._check_new_name(parent, name)
        os.mknod(name, mode, rdev, dir_fd=parent.fd)
        self._give_to_caller(parent, name, ctx)
        return self._lookup_created(parent, name)

    @_errno_boundary
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._writable_dir(parent_inode)
        self._check_new_name(parent, name)
        os.symlink(target, name, dir_fd=parent.fd)
        self._give_to_caller(parent, name, ctx)
        return self._lookup_created(parent, name)

    @_errno_boundary
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._writable_dir(new_parent_inode)
        node = self._real(inode)
        self._check_new_name(parent, new_name)
        # linkat(AT_SYMLINK_FOLLOW) on the magic link links this very inode, even a symlink.
        os.link(node.proc_path, new_name, dst_dir_fd=parent.fd, follow_symlinks=True)
        self.inodes.ref(node)
        return self._real_attrs(node)

    @_errno_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        parent = self._writable_dir(parent_inode)
        os.unlink(name, dir_fd=parent.fd)

    @_errno_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any = None) -> None:
        parent = self._writable_dir(parent_inode)
        os.rmdir(name, dir_fd=parent.fd)

    @_errno_boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any = None,
    ) -> None:
        old_parent = self._writable_dir(parent_inode_old)
        new_parent = self._writable_dir(parent_inode_new)
        self._check_new_name(new_parent, name_new)
        if flags == 0:
            os.rename(name_old, name_new, src_dir_fd=old_parent.fd, dst_dir_fd=new_parent.fd)
            return
        renameat2(old_parent.fd, name_old, new_parent.fd, name_new, flags)

    @_errno_boundary
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any, fh: int | None, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        self._require_writable()
        node = await self._backed(self._inode(inode))
        if node.fd is None:
            raise _fail(errno.EROFS)
        if fields.update_mode:
            if node.is_symlink:
                raise _fail(errno.EOPNOTSUPP)
            os.chmod(node.proc_path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            result = _LIBC.fchownat(
                ctypes.c_int(node.fd), b"", ctypes.c_uint(uid & 0xFFFFFFFF),
                ctypes.c_uint(gid & 0xFFFFFFFF), ctypes.c_int(_AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW),
            )
            if result != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(node.proc_path, attr.st_size)
        if fields.update_atime or fields.update_mtime:
            if node.is_symlink:
                raise _fail(errno.EOPNOTSUPP)
            current = os.fstat(node.fd)
            atime = attr.st_atime_ns if fields.update_atime else current.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns
            os.utime(node.proc_path, ns=(atime, mtime))
        return self._real_attrs(node)

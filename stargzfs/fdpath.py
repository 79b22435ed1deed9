"""File operations relative to directory fds, never following a symlink.

Both the FUSE layer (top dirs under ROOT) and the conversion glue (snapshot fs dirs, the
cache dir) must never be redirected outside ROOT by a symlink planted in a path, so every
component is opened relative to its parent's fd with O_NOFOLLOW, as passthrough_ll does,
and names are only ever resolved inside a directory fd. Writers here publish like
stargzfs.atomicio does for paths: a temp beside the target, fsync, then a rename.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import stat
from collections.abc import Callable, Sequence

DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_NOREPLACE = 1
_LIBC = ctypes.CDLL(None, use_errno=True)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FICLONE = 0x40049409


class NotRegularFile(OSError):
    """A name that must be a regular file is something else (a planted link, a directory...)."""

    def __init__(self, name: str) -> None:
        super().__init__(errno.EINVAL, f"{name} is not a regular file")


def open_dir_beneath(root_fd: int, parts: Sequence[str], *, create: bool = False) -> int:
    """O_PATH fd of root/parts...; a symlink or non-directory component is ENOTDIR.

    With `create`, missing components are made (0755). Bad components ("", ".", "..",
    anything with "/") are EINVAL. The caller owns (closes) the returned fd.
    """
    fd = os.dup(root_fd)
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part:
                raise OSError(errno.EINVAL, f"bad path component {part!r}")
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise OSError(errno.ENOTDIR, f"{part} is a symlink, not a directory") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def proc_path(dir_fd: int, name: str) -> str:
    """A path naming `name` in the directory behind `dir_fd` (valid in children given that fd)."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_regular_at(dir_fd: int, name: str) -> bool:
    info = lstat_at(dir_fd, name)
    return info is not None and stat.S_ISREG(info.st_mode)


def renameat2(src_dir_fd: int, src: str | bytes, dst_dir_fd: int, dst: str | bytes, flags: int) -> None:
    """renameat2(2), which os.rename does not expose (flags such as RENAME_NOREPLACE)."""
    result = _LIBC.renameat2(
        ctypes.c_int(src_dir_fd), os.fsencode(src), ctypes.c_int(dst_dir_fd), os.fsencode(dst), ctypes.c_uint(flags)
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> bool:
    """renameat2(RENAME_NOREPLACE); False if `dst` already exists (then `src` stays)."""
    try:
        renameat2(src_dir_fd, src, dst_dir_fd, dst, RENAME_NOREPLACE)
    except FileExistsError:
        return False
    except OSError as exc:
        raise OSError(exc.errno, f"rename {src} -> {dst}: {exc.strerror}") from None
    return True


def unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def listdir_at(dir_fd: int) -> list[str]:
    """Names in the directory behind `dir_fd` (os.listdir on an fd would consume its offset)."""
    listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.listdir(listing)
    finally:
        os.close(listing)


def publish(
    dir_fd: int, temp: str, final: str, mode: int, *, final_dir_fd: int | None = None, keep_temp: bool = False
) -> bool:
    """chmod the regular file `temp` to `mode`, fsync it, then move it to `final` unless that exists.

    `final` is in `final_dir_fd` when given (same filesystem), else beside `temp`. Returns
    False when `final` already existed: the existing output wins and the temp is removed
    (kept with `keep_temp`, for a caller that compares the two).
    """
    target_fd = dir_fd if final_dir_fd is None else final_dir_fd
    fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(temp)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    if rename_noreplace(dir_fd, temp, target_fd, final):
        return True
    if not keep_temp:
        unlink_quietly(dir_fd, temp)
    return False


def sha256_at(dir_fd: int, name: str) -> str | None:
    """`sha256:<hex>` of a regular file's bytes, None when there is no such file (blocking)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(name)
        digest = hashlib.sha256()
        while piece := os.read(fd, 1 << 20):
            digest.update(piece)
        return "sha256:" + digest.hexdigest()
    finally:
        os.close(fd)


def same_contents(dir_fd: int, name: str, other_dir_fd: int, other: str) -> bool:
    """Whether two regular files hold the same bytes (read in 1 MiB steps; blocking)."""
    fds = []
    try:
        for directory, entry in ((dir_fd, name), (other_dir_fd, other)):
            fds.append(os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory))
        if os.fstat(fds[0]).st_size != os.fstat(fds[1]).st_size:
            return False
        offset = 0
        while True:
            left, right = (os.pread(fd, 1 << 20, offset) for fd in fds)
            if left != right:
                return False
            if not left:
                return True
            offset += len(left)
    finally:
        for fd in fds:
            os.close(fd)


def write_file_at(dir_fd: int, name: str, data: bytes, *, mode: int, temp: str) -> None:
    """Replace `name` atomically with `data`, through the temp name `temp` beside it."""
    fd = os.open(temp, _NEW_FILE, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        unlink_quietly(dir_fd, temp)
        raise


def copy_file_at(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, *, mode: int, temp: str) -> bool:
    """Copy a regular file (reflink, else copy_file_range) to `dst` via `temp`; False if `dst` exists."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(src_fd).st_mode):
            raise NotRegularFile(src)
        out = os.open(temp, _NEW_FILE, 0o600, dir_fd=dst_dir_fd)
        try:
            _clone_or_copy(src_fd, out)
            os.fsync(out)
        finally:
            os.close(out)
        return publish(dst_dir_fd, temp, dst, mode)
    finally:
        os.close(src_fd)
        unlink_quietly(dst_dir_fd, temp)


def _clone_or_copy(src_fd: int, dst_fd: int) -> None:
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return
    except OSError:
        pass
    size = os.fstat(src_fd).st_size
    offset = 0
    try:
        while offset < size:
            copied = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
            if copied == 0:
                break
            offset += copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while offset < size:
        chunk = os.pread(src_fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        os.pwrite(dst_fd, chunk, offset)
        offset += len(chunk)


def remove_matching(dir_fd: int, matches: Callable[[str], bool]) -> list[str]:
    """Delete the entries whose names `matches` in one directory; returns their names.

    A matching directory (a private temp dir of ours) loses its non-directory entries and
    then itself; one that holds a subdirectory is not ours and stays.
    """
    removed = []
    for name in listdir_at(dir_fd):
        if not matches(name):
            continue
        info = lstat_at(dir_fd, name)
        if info is None:
            continue
        if stat.S_ISDIR(info.st_mode):
            if not remove_flat_dir(dir_fd, name):
                continue
        else:
            unlink_quietly(dir_fd, name)
        removed.append(name)
    return removed


def remove_flat_dir(dir_fd: int, name: str) -> bool:
    """Remove a directory of ours with every non-directory in it; False if that is not possible."""
    try:
        inner = open_dir_beneath(dir_fd, [name])
    except OSError:
        return False
    try:
        for entry in listdir_at(inner):
            info = lstat_at(inner, entry)
            if info is not None and not stat.S_ISDIR(info.st_mode):
                unlink_quietly(inner, entry)
    finally:
        os.close(inner)
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError:
        return False
    return True

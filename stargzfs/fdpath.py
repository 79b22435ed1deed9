"""File operations relative to directory fds, never following a symlink.

Both the FUSE layer (top dirs under ROOT) and the pipeline (snapshot fs dirs, the cache
dir) must never be redirected outside ROOT by a symlink planted in a path, so every
component is opened relative to its parent's fd with O_NOFOLLOW, as passthrough_ll does,
and names are only ever resolved inside a directory fd.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence

DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_NOREPLACE = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


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

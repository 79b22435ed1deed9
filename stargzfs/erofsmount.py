"""Mount a RAFS v6 bootstrap with the kernel's erofs, its blobs as file-backed `device=`s.

Through the new mount API (fsopen/fsconfig/fsmount/move_mount) rather than mount(2): each
`device=` is its own parameter there, so an image with many layers is not limited by the
one page mount(2) allows for all options, and the kernel's own reason for a refusal can be
read back from the filesystem context and shown to the user. util-linux `mount -t erofs`
would attach a loop device and reject file paths as devices.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from stargzfs.errors import StargzfsError

_LIBC = ctypes.CDLL(None, use_errno=True)
# unified syscall numbers (asm-generic; the same on x86_64 and arm64)
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSOPEN_CLOEXEC = 1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 1
_MOUNT_ATTR_RDONLY = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_FDCWD = -100
_MNT_DETACH = 2


class KernelMountError(StargzfsError):
    """The kernel refused the mount (its reason is in the message); exit code 1."""


def _syscall(number: int, *args: object) -> int:
    # syscall(2) is variadic and reads longs: widen ints so no upper half is left undefined
    wide = [ctypes.c_long(arg) if isinstance(arg, int) else arg for arg in args]
    result = _LIBC.syscall(ctypes.c_long(number), *wide)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _kernel_log(fs_fd: int) -> str:
    """What the kernel said about the filesystem context (`e <message>` lines)."""
    lines = []
    for _ in range(16):
        try:
            line = os.read(fs_fd, 1024).decode("utf-8", "replace").strip()
        except OSError:
            break
        if not line:
            break
        lines.append(line[2:] if line[1:2] == " " else line)
    return "; ".join(lines)


def mount_erofs(bootstrap: Path, devices: Sequence[Path], target: Path) -> None:
    """Mount `bootstrap` read-only at `target`, `devices` in blob-table order."""
    fs_fd = -1
    try:
        fs_fd = _syscall(_SYS_FSOPEN, b"erofs", _FSOPEN_CLOEXEC)
        params = [(b"source", os.fsencode(bootstrap))] + [(b"device", os.fsencode(device)) for device in devices]
        for key, value in params:
            _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_SET_STRING, key, value, 0)
        _syscall(_SYS_FSCONFIG, fs_fd, _FSCONFIG_CMD_CREATE, None, None, 0)
        mount_fd = _syscall(_SYS_FSMOUNT, fs_fd, _FSMOUNT_CLOEXEC, _MOUNT_ATTR_RDONLY)
        try:
            _syscall(_SYS_MOVE_MOUNT, mount_fd, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mount_fd)
    except OSError as exc:
        reason = _kernel_log(fs_fd) if fs_fd >= 0 else ""
        detail = f"{exc.strerror}" + (f" ({reason})" if reason else "")
        if exc.errno == errno.ENODEV:
            detail += ": this kernel has no erofs (modprobe erofs)"
        raise KernelMountError(f"cannot mount {bootstrap} at {target}: {detail}") from None
    finally:
        if fs_fd >= 0:
            os.close(fs_fd)


def unmount(target: Path, *, lazy: bool = False) -> None:
    if _LIBC.umount2(os.fsencode(target), _MNT_DETACH if lazy else 0) != 0:
        code = ctypes.get_errno()
        raise KernelMountError(f"cannot unmount {target}: {os.strerror(code)}")

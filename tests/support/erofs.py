"""Kernel oracles: mount bootstraps with the real erofs driver and compare trees.

The kernel's erofs (file-backed, Linux ≥ 6.12) and overlayfs are the independent judges of
what stargzfs builds, so these helpers call mount(2) directly: util-linux `mount -t erofs`
attaches a loop device and then rejects regular-file `device=` options (rafs-v6 spec §9).
Every helper that mounts also unmounts in `finally`, so a failing test leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

MS_RDONLY = 1
MNT_DETACH = 2
SNAPSHOT_XATTR_PREFIXES = ("user.", "trusted.", "security.")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _raise_errno(what: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    result = _libc.mount(
        os.fsencode(source), os.fsencode(str(target)), fstype.encode(), flags, os.fsencode(data)
    )
    if result != 0:
        _raise_errno(f"mount -t {fstype} {source} {target} -o {data}")


def mount_erofs(bootstrap: Path, mountpoint: Path, devices: Sequence[Path]) -> None:
    """File-backed erofs mount; one absolute `device=` per blob, in blob-table order."""
    options = ",".join(f"device={Path(device).resolve()}" for device in devices)
    _mount(str(Path(bootstrap).resolve()), Path(mountpoint), "erofs", MS_RDONLY, options)


def mount_overlay(lowers_top_first: Sequence[Path], mountpoint: Path) -> None:
    """Read-only overlayfs of lower dirs (topmost first, like `lowerdir=` wants them).

    The kernel refuses a single lowerdir without an upperdir; a one-layer stack is just
    that layer, so compare against it directly.
    """
    if len(lowers_top_first) < 2:
        raise ValueError("a read-only overlay needs at least two lower directories")
    lowers = ":".join(str(Path(lower).resolve()) for lower in lowers_top_first)
    _mount("overlay", Path(mountpoint), "overlay", MS_RDONLY, f"lowerdir={lowers}")


def umount(mountpoint: Path) -> None:
    """Unmount, retrying briefly on EBUSY, then lazily so no mount outlives a test."""
    target = os.fsencode(str(mountpoint))
    for _ in range(20):
        if _libc.umount2(target, 0) == 0:
            return
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):
            return  # not mounted (any more)
        if code != errno.EBUSY:
            raise OSError(code, f"umount {mountpoint}: {os.strerror(code)}")
        time.sleep(0.05)
    if _libc.umount2(target, MNT_DETACH) != 0:
        _raise_errno(f"umount -l {mountpoint}")


@contextlib.contextmanager
def _temporary_mountpoint() -> Iterator[Path]:
    mountpoint = Path(tempfile.mkdtemp(prefix="stargzfs-mnt-"))
    try:
        yield mountpoint
    finally:
        umount(mountpoint)
        mountpoint.rmdir()


@contextlib.contextmanager
def erofs_mounted(bootstrap: Path, devices: Sequence[Path] = ()) -> Iterator[Path]:
    """`with erofs_mounted(boot, [dev]) as root:` — unmounted and removed on exit."""
    with _temporary_mountpoint() as mountpoint:
        mount_erofs(bootstrap, mountpoint, devices)
        yield mountpoint


@contextlib.contextmanager
def overlay_mounted(lowers_top_first: Sequence[Path]) -> Iterator[Path]:
    with _temporary_mountpoint() as mountpoint:
        mount_overlay(lowers_top_first, mountpoint)
        yield mountpoint


def fsck_erofs(bootstrap: Path, devices: Sequence[Path] = ()) -> subprocess.CompletedProcess[str]:
    """fsck.erofs reads every inode, dirent and data block; callers assert returncode == 0."""
    argv = ["fsck.erofs", *(f"--device={Path(device).resolve()}" for device in devices), str(bootstrap)]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _file_type(mode: int) -> str:
    for name, test in (
        ("dir", stat.S_ISDIR),
        ("reg", stat.S_ISREG),
        ("symlink", stat.S_ISLNK),
        ("fifo", stat.S_ISFIFO),
        ("char", stat.S_ISCHR),
        ("block", stat.S_ISBLK),
        ("socket", stat.S_ISSOCK),
    ):
        if test(mode):
            return name
    return "unknown"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _xattrs(path: Path) -> list[tuple[str, str]]:
    names = sorted(
        name for name in os.listxattr(path, follow_symlinks=False) if name.startswith(SNAPSHOT_XATTR_PREFIXES)
    )
    return [(name, os.getxattr(path, name, follow_symlinks=False).hex()) for name in names]


def tree_snapshot(root: Path, *, uid_gid: bool = True, mtime: bool = True) -> dict[str, dict]:
    """Everything a layer defines about each path, keyed "/rel/path" ("/" is the root).

    Directory sizes are left out (they depend on the filesystem). Hardlinked files get
    `link_group` = the smallest path of their group, so two trees compare equal exactly when
    the same paths are linked together, whatever the inode numbers.
    """
    root = Path(root)
    snapshot: dict[str, dict] = {}
    inode_paths: dict[tuple[int, int], list[str]] = {}
    pending = [root]
    while pending:
        current = pending.pop()
        rel = "/" + current.relative_to(root).as_posix() if current != root else "/"
        info = current.lstat()
        kind = _file_type(info.st_mode)
        record: dict = {"type": kind, "mode": oct(stat.S_IMODE(info.st_mode))}
        if kind == "reg":
            record["size"] = info.st_size
            record["sha256"] = _sha256_file(current)
            inode_paths.setdefault((info.st_dev, info.st_ino), []).append(rel)
        elif kind == "symlink":
            record["size"] = info.st_size
            record["target"] = os.readlink(current)
        elif kind in ("char", "block"):
            record["rdev"] = (os.major(info.st_rdev), os.minor(info.st_rdev))
        record["xattrs"] = _xattrs(current)
        if mtime:
            record["mtime"] = int(info.st_mtime)
        if uid_gid:
            record["uid"], record["gid"] = info.st_uid, info.st_gid
        record["link_group"] = None
        snapshot[rel] = record
        if kind == "dir":
            pending.extend(current / name for name in os.listdir(current))
    for paths in inode_paths.values():
        if len(paths) > 1:
            group = min(paths)
            for path in paths:
                snapshot[path]["link_group"] = group
    return snapshot


def extract_layer_tar(tar_path: Path, dest: Path) -> None:
    """Extract as root the way a container runtime does: owners, modes, xattrs, devices kept.

    GNU tar rather than Python's tarfile because tarfile drops SCHILY.xattr headers and
    cannot set symlink mtimes. Whiteout files stay plain files (no overlay interpretation).
    Directory mtimes are re-applied at the end, like containerd does: GNU tar restores them
    when it leaves a directory, and a later member inside it would change them again.
    """
    Path(dest).mkdir(parents=True, exist_ok=True)
    argv = [
        "tar", "--extract", "--file", str(tar_path), "--directory", str(dest),
        "--xattrs", "--xattrs-include=*", "--numeric-owner", "--same-owner",
        "--same-permissions",
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"tar could not extract {tar_path}: {result.stderr.strip()}")
    with tarfile.open(tar_path) as archive:
        directory_mtimes = {member.name: int(member.mtime) for member in archive if member.isdir()}
    for name, mtime in directory_mtimes.items():
        os.utime(Path(dest) / name, (mtime, mtime), follow_symlinks=False)

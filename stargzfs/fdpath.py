"""Walking down from a directory fd without ever following a symlink.

Both the FUSE layer (top dirs under ROOT) and the pipeline (snapshot fs dirs, the cache
dir) must never be redirected outside ROOT by a symlink planted in a path, so every
component is opened relative to its parent's fd with O_NOFOLLOW, as passthrough_ll does.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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

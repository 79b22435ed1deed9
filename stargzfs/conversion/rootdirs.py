"""The directories a mount writes into, reached beneath ROOT without following any link.

ROOT is opened once; every snapshot fs dir and the cache dir are then opened component by
component with O_NOFOLLOW (stargzfs.fdpath), so a symlink planted where a snapshot dir
should be can never send a write outside ROOT. Killed conversions leave temps behind:
they are swept at start-up, but only where this mount writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from stargzfs.errors import UsageError
from stargzfs.fdpath import open_dir_beneath, remove_matching
from stargzfs.snapshots import layout


class RootDirs:
    """ROOT, its snapshot fs dirs and the blob.meta dir, as fds; close() when done."""

    def __init__(self, root: Path, cache_dir: Path, *, fscache: bool) -> None:
        self.root = root
        self.cache_dir = cache_dir
        self.fscache = fscache
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.cache_fd = -1 if fscache and not cache_dir.is_dir() else self._open_cache_dir()

    def close(self) -> None:
        for fd in {self._root_fd, self.cache_fd}:
            if fd >= 0:
                os.close(fd)
        self._root_fd = self.cache_fd = -1

    def lazy_cache_fd(self) -> int:
        """The blobcache dir of lazy blob serving: the cache dir, made on first use with fscache."""
        if self.cache_fd < 0:
            self.cache_fd = self._open_cache_dir()
        return self.cache_fd

    def open_fs(self, snapshot_id: str) -> int:
        """O_PATH fd of ROOT/snapshots/<id>/fs (caller closes); ENOTDIR for a planted link."""
        return open_dir_beneath(self._root_fd, layout.fs_dir_parts(snapshot_id))

    def blob_meta_dir(self, fs_fd: int) -> int:
        """Where a layer's blob.meta goes: the cache dir (fusedev) or its own fs dir (fscache)."""
        return fs_fd if self.fscache else self.lazy_cache_fd()

    def _open_cache_dir(self) -> int:
        """The fusedev blob.meta dir; under ROOT it is reached without following symlinks."""
        cache = self.cache_dir
        try:
            relative = cache.relative_to(self.root)
        except ValueError:
            relative = None
        try:
            if relative is not None and relative.parts:
                return open_dir_beneath(self._root_fd, relative.parts, create=True)
            cache.mkdir(parents=True, exist_ok=True)
            return os.open(cache, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cache dir {cache} is not usable: {exc.strerror}") from None

    def sweep_temps(self, candidate_ids: Iterable[str]) -> list[str]:
        """Remove what killed conversions left; returns one note per removed file.

        Only the dirs this mount writes into are swept: those of eStargz candidates and the
        cache dir. Other snapshots' dirs (containers' rootfs, nydus layers) are not ours, so
        a user file that happens to look like a temp stays.
        """
        notes = []
        for snapshot_id in candidate_ids:
            try:
                fs_fd = self.open_fs(snapshot_id)
            except OSError:
                continue
            try:
                for name in remove_matching(fs_fd, layout.is_temp_name):
                    notes.append(f"removed stale temp snapshots/{snapshot_id}/fs/{name}")
            finally:
                os.close(fs_fd)
        if self.cache_fd >= 0:
            for name in remove_matching(self.cache_fd, layout.is_temp_name):
                notes.append(f"removed stale temp {self.cache_dir}/{name}")
        return notes

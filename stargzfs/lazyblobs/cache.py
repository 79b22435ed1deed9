"""One blob's local cache in nydusd's blobcache layout: `<hex>` and `<hex>.chunk_map`.

`<hex>` holds uncompressed chunks at their uncompressed offsets (sparse until filled), the
chunk map says which are complete (stargzfs.rafs.chunkmap). Both live in the fusedev cache
dir, so a later nydusd with `work_dir` there finds what the mount fetched, and a remount
serves what is present without asking the registry. Crash-safe ordering: data written and
fdatasync'ed, then its bits set; bits are only ever set; both files are created at their
final size before any bit is.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Sequence

from stargzfs.errors import FormatError
from stargzfs.fdpath import NotRegularFile, lstat_at, publish, unlink_quietly
from stargzfs.rafs import chunkmap
from stargzfs.snapshots import layout

_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


class BlobCache:
    """The two files of one blob, open for the mount's lifetime; `close()` when done."""

    def __init__(self, dir_fd: int, blob_id: str, *, chunk_count: int, size: int) -> None:
        self.blob_id = blob_id
        self.chunk_count = chunk_count
        self.size = size
        self._data_fd, created = _open_or_create(dir_fd, blob_id, lambda fd: os.ftruncate(fd, size), size)
        map_name = blob_id + ".chunk_map"
        map_size = chunkmap.file_size(chunk_count)
        try:
            if created:
                unlink_quietly(dir_fd, map_name)  # its bits would describe data that is gone
            for attempt in range(2):
                self._map_fd, _ = _open_or_create(
                    dir_fd, map_name, lambda fd: os.pwrite(fd, chunkmap.empty(chunk_count), 0), map_size
                )
                try:
                    self.present = chunkmap.decode(os.pread(self._map_fd, map_size, 0), chunk_count)
                    break
                except FormatError:
                    os.close(self._map_fd)
                    if attempt:
                        raise
                    unlink_quietly(dir_fd, map_name)  # not a map we can trust: start empty
        except BaseException:
            os.close(self._data_fd)
            raise
        self.present_count = chunkmap.count(self.present, chunk_count)
        self._marking = threading.Lock()

    def close(self) -> None:
        for fd in (self._data_fd, self._map_fd):
            os.close(fd)

    def has(self, index: int) -> bool:
        return chunkmap.is_set(self.present, index)

    def read(self, offset: int, size: int) -> bytes:
        """Bytes of the uncompressed blob (the caller made sure the chunks are present)."""
        return os.pread(self._data_fd, size, offset)

    def write(self, offset: int, data: bytes) -> int:
        """Put one chunk's bytes in place, not yet durable nor marked: `read` sees them
        at once (page cache); only `commit` makes them count after a crash. Blocking."""
        view = memoryview(data)
        at = offset
        while view:
            done = os.pwrite(self._data_fd, view, at)
            view, at = view[done:], at + done
        return len(data)

    def commit(self, marked: Sequence[int]) -> None:
        """Make everything written so far durable, then set the bits of `marked`. Blocking."""
        if not marked:
            return
        os.fdatasync(self._data_fd)  # the bytes are durable before any bit says so
        with self._marking:  # fetches commit from several worker threads; a bit must not be lost
            touched: dict[int, int] = {}
            for index in marked:
                position, mask = chunkmap.bit(index)
                byte = position - chunkmap.HEADER_SIZE
                if not self.present[byte] & mask:
                    self.present[byte] |= mask
                    self.present_count += 1
                touched[position] = self.present[byte]
            for position, value in sorted(touched.items()):
                os.pwrite(self._map_fd, bytes([value]), position)
            if self.present_count == self.chunk_count:
                os.pwrite(self._map_fd, chunkmap.all_ready_header(), 0)


def _open_or_create(dir_fd: int, name: str, initialise: Callable[[int], object], size: int) -> tuple[int, bool]:
    """(fd, created) of the file `name` in the cache dir; a new one appears only complete.

    An existing file of the wrong size or type is not ours to trust: it is replaced (an
    empty cache is always correct, only slower).
    """
    info = lstat_at(dir_fd, name)
    if info is not None:
        if stat.S_ISREG(info.st_mode) and info.st_size == size:
            return os.open(name, _OPEN_FLAGS, dir_fd=dir_fd), False
        if stat.S_ISDIR(info.st_mode):
            raise NotRegularFile(name)
        unlink_quietly(dir_fd, name)
    temp = layout.convert_temp_name("-cache-")
    fd = os.open(temp, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
    try:
        initialise(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        publish(dir_fd, temp, name, 0o600)  # False: another opener created it meanwhile, use theirs
    finally:
        unlink_quietly(dir_fd, temp)
    fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    if os.fstat(fd).st_size != size:
        os.close(fd)
        raise FormatError(f"cache file {name} changed size while it was opened")
    return fd, True

"""Output files that appear complete or not at all.

Every writer goes through here: a temp file in the target's own directory (so the rename
cannot cross filesystems), fsync, rename over the target, fsync the directory (so a crash
cannot bring the old file back). Any failure removes the temp file and surfaces as ONE
OutputError line naming the target — a full disk or a read-only mount is an expected
failure, not a traceback — with exit code 1 wherever it happens.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from stargzfs.errors import StargzfsError

DEFAULT_MODE = 0o644  # before the umask, like a plain open() of a data file


class OutputError(StargzfsError):
    """An output could not be written (directory missing or read-only, disk full, ...)."""

    exit_code = 1


def output_error(path: Path, exc: OSError) -> OutputError:
    """The one-line form of an OSError met while producing `path`."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"cannot write {path}: {reason}")


class AtomicFile:
    """The open temp file behind `atomic_output`; its OSErrors become OutputErrors for the target.

    Only operations on the output go through here, so an OSError from reading some input
    inside the same `with` block is never mislabelled as an output failure.
    """

    def __init__(self, target: Path, temp: Path, fd: int) -> None:
        self.target = target
        self.temp = temp
        self._fd = fd
        self.closed = False

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Once only: the fd number may belong to another file afterwards."""
        if not self.closed:
            self.closed = True
            os.close(self._fd)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append all of `data` (os.write may write less than asked)."""
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            raise output_error(self.target, exc) from None

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of `data` at `offset` (sparse files: untouched ranges stay holes)."""
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise output_error(self.target, exc) from None

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise output_error(self.target, exc) from None

    def map(self, size: int) -> mmap.mmap:
        """The temp as `size` zeroed bytes, mapped shared and writable. The blocks are
        allocated first, so a full disk is an OutputError here and not a SIGBUS mid-write."""
        try:
            os.ftruncate(self._fd, 0)
            os.posix_fallocate(self._fd, 0, size)
            return mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise output_error(self.target, exc) from None

    def sync_mapping(self, mapping: mmap.mmap) -> None:
        """msync a mapping made by `map`: what was written through it reaches the file."""
        try:
            mapping.flush()
        except OSError as exc:
            raise output_error(self.target, exc) from None


_TEMP_NAME = re.compile(r"\.(.+)\.tmp-[0-9]+-[0-9a-f]{8}")


def temp_name_for(target_name: str) -> str:
    """The temp name a write of `target_name` goes through (hidden: starts with a dot)."""
    return f".{target_name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"


def temp_target(name: str) -> str | None:
    """The output a temp name of `temp_name_for` was for; None for any other name.

    Readers of a directory a builder writes into (the mount's sweep of killed conversions)
    recognise these temps through here: the format has exactly one definition.
    """
    match = _TEMP_NAME.fullmatch(name)
    return match.group(1) if match else None


def _open_temp(target: Path, mode: int) -> AtomicFile:
    temp = target.with_name(temp_name_for(target.name))
    try:
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise output_error(target, exc) from None
    return AtomicFile(target, temp, fd)


def _finish(handle: AtomicFile) -> None:
    """fsync and close the temp file (it stays under its temp name)."""
    try:
        os.fsync(handle.fileno())
    except OSError as exc:
        raise output_error(handle.target, exc) from None
    finally:
        handle.close()


def _discard(handle: AtomicFile) -> None:
    try:
        handle.close()
    except OSError:
        pass
    try:
        os.unlink(handle.temp)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # nothing better to do; the original failure is what the user needs to see


def _sync_directory(directory: Path, target: Path) -> None:
    """Make the rename durable; filesystems that cannot fsync a directory (EINVAL) are fine."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise output_error(target, exc) from None


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


@contextmanager
def atomic_output(path: Path | str, *, mode: int = DEFAULT_MODE) -> Iterator[AtomicFile]:
    """Stream into `path`: it appears when the block completes, and not at all if it raises."""
    target = Path(path)
    handle = _open_temp(target, mode)
    try:
        yield handle
    except BaseException:
        _discard(handle)
        raise
    try:
        _finish(handle)
        os.replace(handle.temp, target)
    except OSError as exc:
        _discard(handle)
        raise output_error(target, exc) from None
    except BaseException:
        _discard(handle)
        raise
    _sync_directory(_parent(target), target)


def write_atomically(path: Path | str, data: bytes | bytearray | memoryview, *, mode: int = DEFAULT_MODE) -> None:
    """Replace `path` with exactly `data`."""
    with atomic_output(path, mode=mode) as handle:
        handle.write(data)


def open_output(path: Path | str, *, mode: int = DEFAULT_MODE) -> AtomicFile:
    """A temp beside `path` for output written in place (e.g. through a mapping): pass it
    to write_files_atomically, which renames it, or to discard_output."""
    return _open_temp(Path(path), mode)


def discard_output(handle: AtomicFile) -> None:
    """Close and remove an open_output temp that will not be used."""
    _discard(handle)


def write_files_atomically(
    outputs: Sequence[tuple[Path | str, bytes | bytearray] | AtomicFile], *, mode: int = DEFAULT_MODE
) -> None:
    """Several outputs: every temp is written and synced before the first rename.

    So a full disk or a bad directory leaves all targets untouched. Renames happen in
    the given order — put the file that marks completion (e.g. the bootstrap) last. An
    AtomicFile from open_output is already written: it is synced and renamed in its turn
    (and removed, like the others, if anything fails).
    """
    handles: list[AtomicFile] = []  # in `outputs` order
    renamed = 0
    try:
        for output in outputs:
            if isinstance(output, AtomicFile):
                handles.append(output)
                _finish(output)
                continue
            path, data = output
            handle = _open_temp(Path(path), mode)
            handles.append(handle)
            try:
                handle.write(data)
            except BaseException:
                handle.close()
                raise
            _finish(handle)
        for handle in handles:
            try:
                os.replace(handle.temp, handle.target)
            except OSError as exc:
                raise output_error(handle.target, exc) from None
            renamed += 1
    except BaseException:
        for handle in handles[renamed:]:
            _discard(handle)
        for output in outputs:  # prepared temps the loop had not reached
            if isinstance(output, AtomicFile) and output not in handles:
                _discard(output)
        raise
    for directory, target in {_parent(h.target): h.target for h in handles}.items():
        _sync_directory(directory, target)

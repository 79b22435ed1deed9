"""Read-only, lock-free reader for bbolt (etcd-io/bbolt v1.3.x) database files.

The snapshotter keeps metadata.db open with an exclusive flock for its whole life, so
we cannot open it with bbolt's own (shared-flock) read path. bbolt writes
copy-on-write and commits by flipping a meta page, so a reader that remembers the
txid of the meta it started from, walks the tree with plain `pread`, and re-reads
the meta afterwards gets a consistent view whenever the txid did not move: pages
reachable from meta T can only be reused by transaction T+2, which needs T+1's
meta to be committed first. If the txid moved, the walk is retried (bounded).

Every structural field is bounds-checked and every page may be reached only once
per read, so corrupt input ends in FormatError instead of a hang or an IndexError.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from stargzfs.errors import FormatError, StargzfsError, UsageError

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_HEADER_SIZE = 16
META_SIZE = 64
ELEMENT_SIZE = 16
BUCKET_HEADER_SIZE = 16

BRANCH_PAGE = 0x01
LEAF_PAGE = 0x02
META_PAGE = 0x04
FREELIST_PAGE = 0x10
BUCKET_LEAF_FLAG = 0x01

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 16
DEFAULT_ATTEMPTS = 50
#: Walks of the live file before falling back to copying it first. A walk parses in
#: Python and can outlast a busy writer's commit interval every time; one pread of the
#: whole file is a far shorter window, so the copy succeeds where walks starve.
LIVE_WALK_ATTEMPTS = 5

_PAGE_HEADER = struct.Struct("<QHHI")
_META = struct.Struct("<IIIIQQQQQQ")
_BUCKET_HEADER = struct.Struct("<QQ")
_LEAF_ELEMENT = struct.Struct("<IIII")
_BRANCH_ELEMENT = struct.Struct("<IIQ")

_FNV64_OFFSET = 0xCBF29CE484222325
_FNV64_PRIME = 0x100000001B3
_U64 = (1 << 64) - 1

T = TypeVar("T")


class DatabaseMissingError(UsageError):
    """The database file does not exist (not a snapshotter root, or not created yet)."""


class DatabaseBusyError(StargzfsError):
    """Writers committed during every one of our bounded read attempts."""

    exit_code = 75  # EX_TEMPFAIL: trying again later can succeed


def fnv1a64(data: bytes) -> int:
    """bbolt's meta checksum (hash/fnv New64a)."""
    value = _FNV64_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV64_PRIME) & _U64
    return value


@dataclass(frozen=True)
class Meta:
    page_size: int
    flags: int
    root_pgid: int
    root_sequence: int
    freelist_pgid: int
    high_water_pgid: int
    txid: int


def parse_meta(page: bytes) -> Meta | str:
    """Return the meta stored in a meta page, or why it is not a valid one."""
    raw = page[PAGE_HEADER_SIZE : PAGE_HEADER_SIZE + META_SIZE]
    if len(raw) < META_SIZE:
        return "too short"
    magic, version, page_size, flags, root, seq, freelist, hwm, txid, checksum = _META.unpack(raw)
    if magic != MAGIC:
        return f"bad magic 0x{magic:08x}"
    if version != VERSION:
        return f"unsupported bbolt version {version}"
    if checksum != fnv1a64(raw[:56]):
        return "checksum mismatch"
    if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE) or page_size & (page_size - 1):
        return f"implausible page size {page_size}"
    if not (2 <= root < hwm):
        return f"root page {root} outside [2, {hwm})"
    return Meta(page_size, flags, root, seq, freelist, hwm, txid)


def _pread_exact(fd: int, size: int, offset: int, what: str, path: Path) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise FormatError(
            f"{path}: truncated ({what} needs bytes {offset}..{offset + size}, "
            f"file has {os.fstat(fd).st_size})"
        )
    return data


def read_meta(fd: int, path: Path) -> Meta:
    """The valid meta with the highest txid (bbolt falls back the same way)."""
    size = os.fstat(fd).st_size
    if size == 0:
        raise FormatError(f"{path}: empty file, not a bbolt database")
    first = os.pread(fd, 0x1000, 0)
    meta0 = parse_meta(first)
    candidates: list[Meta] = []
    problems: list[str] = []
    if isinstance(meta0, Meta):
        candidates.append(meta0)
        page_sizes = [meta0.page_size]
    else:
        problems.append(f"meta page 0: {meta0}")
        page_sizes = [MIN_PAGE_SIZE << shift for shift in range(8)]
    for page_size in page_sizes:
        meta1 = parse_meta(os.pread(fd, PAGE_HEADER_SIZE + META_SIZE, page_size))
        if isinstance(meta1, Meta) and meta1.page_size == page_size:
            candidates.append(meta1)
            break
    else:
        problems.append("meta page 1: not found or invalid")
    if not candidates:
        raise FormatError(f"{path}: not a valid bbolt database ({'; '.join(problems)})")
    return max(candidates, key=lambda meta: meta.txid)


class Tx:
    """One read attempt pinned to a meta; reads pages and remembers which it has visited."""

    def __init__(self, fd: int, path: Path, meta: Meta, image: bytes | None = None) -> None:
        self.fd = fd
        self.path = path
        self.meta = meta
        self.image = image  # a copy of the file taken under this meta, else read the live file
        self.size = len(image) if image is not None else os.fstat(fd).st_size
        self.visited: set[int] = set()  # page ids read so far; a second visit means corruption

    def read(self, size: int, offset: int, what: str) -> bytes:
        """Exactly `size` bytes at `offset`; sizes come from the file, so check before allocating."""
        if offset + size > self.size:
            raise FormatError(
                f"{self.path}: truncated or corrupt ({what} needs bytes {offset}..{offset + size}, "
                f"file has {self.size})"
            )
        if self.image is None:
            return _pread_exact(self.fd, size, offset, what, self.path)
        return self.image[offset : offset + size]

    def root(self) -> Bucket:
        return Bucket(self, self.meta.root_pgid, self.meta.root_sequence, None, "root bucket")

    def fail(self, message: str) -> FormatError:
        return FormatError(f"{self.path}: {message}")

    def page(self, pgid: int, owner: Bucket) -> tuple[int, int, bytes]:
        """(flags, count, bytes of the whole page span) of a branch or leaf page, checked."""
        meta = self.meta
        if not 2 <= pgid < meta.high_water_pgid:
            raise self.fail(
                f"bucket {owner.name} points at page {pgid}, outside [2, {meta.high_water_pgid})"
            )
        if pgid in self.visited:
            raise self.fail(f"page {pgid} is referenced twice (bucket {owner.name})")
        self.visited.add(pgid)
        page_size = meta.page_size
        data = self.read(page_size, pgid * page_size, f"page {pgid}")
        page_id, flags, count, overflow = _PAGE_HEADER.unpack_from(data)
        if page_id != pgid:
            raise self.fail(f"page {pgid} carries id {page_id} (bucket {owner.name})")
        if flags != BRANCH_PAGE and flags != LEAF_PAGE:
            raise self.fail(f"page {pgid} has flags 0x{flags:x}, expected a branch or leaf (bucket {owner.name})")
        if overflow:
            if pgid + overflow >= meta.high_water_pgid:
                raise self.fail(f"page {pgid} overflows {overflow} pages past the high-water mark")
            data += self.read(overflow * page_size, (pgid + 1) * page_size, f"page {pgid} overflow")
        return flags, count, data


def _leaf_entries(data: bytes, count: int, owner: Bucket, pgid: int | None) -> list[tuple[bytes, bytes, bool]]:
    """(key, value, is_bucket) of every leaf element; a hot path, hence the flat loop."""
    if count == 0:
        return []
    span = len(data)
    end_of_elements = PAGE_HEADER_SIZE + count * ELEMENT_SIZE
    if end_of_elements > span:
        raise owner.fail(pgid, f"claims {count} elements, impossible in {span} bytes")
    entries: list[tuple[bytes, bytes, bool]] = []
    append = entries.append
    element = PAGE_HEADER_SIZE
    for flags, pos, ksize, vsize in _LEAF_ELEMENT.iter_unpack(data[PAGE_HEADER_SIZE:end_of_elements]):
        start = element + pos
        middle = start + ksize
        end = middle + vsize
        if end > span or start < end_of_elements:
            index = (element - PAGE_HEADER_SIZE) // ELEMENT_SIZE
            raise owner.fail(pgid, f"element {index} points outside the page")
        append((data[start:middle], data[middle:end], flags & BUCKET_LEAF_FLAG == BUCKET_LEAF_FLAG))
        element += ELEMENT_SIZE
    return entries


class Bucket:
    """A bucket: its sequence plus its entries (key, value, is_bucket), read once, in key order."""

    def __init__(
        self,
        tx: Tx,
        root_pgid: int,
        sequence: int,
        inline: bytes | None,
        key: bytes | str,
        parent: Bucket | None = None,
    ) -> None:
        self.tx = tx
        self.root_pgid = root_pgid
        self.sequence = sequence
        self._key = key
        self._parent = parent
        self._inline = inline
        self._entries: list[tuple[bytes, bytes, bool]] | None = None
        self._index: dict[bytes, tuple[bytes, bool]] | None = None

    @property
    def name(self) -> str:
        """Slash-joined path from the root, for error messages only (hence computed lazily)."""
        own = self._key if isinstance(self._key, str) else self._key.decode("utf-8", "replace")
        if self._parent is None or self._parent._parent is None:
            return own
        return f"{self._parent.name}/{own}"

    def fail(self, pgid: int | None, message: str) -> FormatError:
        where = f"inline bucket {self.name}" if pgid is None else f"page {pgid} of bucket {self.name}"
        return self.tx.fail(f"{where}: {message}")

    def entries(self) -> list[tuple[bytes, bytes, bool]]:
        """All (key, raw value, is_bucket) in key order; a sub-bucket's raw value is its header."""
        if self._entries is None:
            self._entries = self._walk()
        return self._entries

    def _walk(self) -> list[tuple[bytes, bytes, bool]]:
        if self._inline is not None:
            data = self._inline
            if len(data) < PAGE_HEADER_SIZE:
                raise self.fail(None, "shorter than a page header")
            _, flags, count, _ = _PAGE_HEADER.unpack_from(data)
            if flags != LEAF_PAGE:
                raise self.fail(None, f"not a leaf (flags 0x{flags:x})")
            return _leaf_entries(data, count, self, None)
        entries: list[tuple[bytes, bytes, bool]] = []
        stack = [self.root_pgid]
        while stack:
            pgid = stack.pop()
            flags, count, data = self.tx.page(pgid, self)
            if flags == LEAF_PAGE:
                entries += _leaf_entries(data, count, self, pgid)
                continue
            end = PAGE_HEADER_SIZE + count * ELEMENT_SIZE
            if count == 0 or end > len(data):
                raise self.fail(pgid, f"branch claims {count} elements, impossible in {len(data)} bytes")
            children = [child for _, _, child in _BRANCH_ELEMENT.iter_unpack(data[PAGE_HEADER_SIZE:end])]
            stack.extend(reversed(children))
        return entries

    def _lookup(self) -> dict[bytes, tuple[bytes, bool]]:
        if self._index is None:
            self._index = {key: (value, is_bucket) for key, value, is_bucket in self.entries()}
        return self._index

    def get(self, key: bytes) -> bytes | None:
        """The value stored at key; None when absent or when key names a sub-bucket."""
        found = self._lookup().get(key)
        if found is None or found[1]:
            return None
        return found[0]

    def bucket(self, key: bytes) -> Bucket | None:
        found = self._lookup().get(key)
        if found is None or not found[1]:
            return None
        return self.open(key, found[0])

    def open(self, key: bytes, header: bytes) -> Bucket:
        """The sub-bucket whose raw value (header [+ inline page]) is `header`."""
        if len(header) < BUCKET_HEADER_SIZE:
            raise Bucket(self.tx, 0, 0, None, key, self).fail(None, f"header is {len(header)} bytes")
        root, sequence = _BUCKET_HEADER.unpack_from(header)
        return Bucket(self.tx, root, sequence, header[BUCKET_HEADER_SIZE:] if root == 0 else None, key, self)


def read_consistent(
    path: Path,
    visit: Callable[[Tx], T],
    *,
    attempts: int = DEFAULT_ATTEMPTS,
    live_attempts: int = LIVE_WALK_ATTEMPTS,
    stats: dict[str, int] | None = None,
) -> tuple[T, int]:
    """Run `visit` on a consistent view of the database; returns (result, txid).

    Never takes a lock. An error raised by `visit` counts only if the txid did not
    move meanwhile (a moving writer may legitimately leave us looking at reused pages).
    `stats`, if given, receives "attempts" (1 = no retry was needed).
    """
    path = Path(path)
    last_txids: list[int] = []
    for attempt in range(attempts):
        if stats is not None:
            stats["attempts"] = attempt + 1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DatabaseMissingError(f"{path}: no such file") from None
        except OSError as exc:
            raise StargzfsError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise FormatError(f"{path}: not a regular file, so not a bbolt database")
            meta = read_meta(fd, path)
            image: bytes | None = None
            if attempt >= live_attempts:
                # pages past the file's end cannot be read anyway: never size a buffer by them
                image = os.pread(fd, min(meta.high_water_pgid * meta.page_size, os.fstat(fd).st_size), 0)
                copied_under = read_meta(fd, path)
            failure: StargzfsError | None = None
            result: T | None = None
            try:
                if image is None or copied_under.txid == meta.txid:
                    result = visit(Tx(fd, path, meta, image))
            except StargzfsError as exc:
                failure = exc
            except (struct.error, IndexError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
                # Defence in depth: every structure is bounds-checked, but corrupt bytes must
                # never surface as a traceback.
                failure = FormatError(f"{path}: malformed database ({type(exc).__name__}: {exc})")
            # The copy is consistent if no commit landed while it was taken; a live walk
            # only if none landed during the whole walk.
            after = copied_under if image is not None else read_meta(fd, path)
        except OSError as exc:
            raise StargzfsError(f"{path}: cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        if after.txid == meta.txid:
            if failure is not None:
                raise failure
            return result, meta.txid  # type: ignore[return-value]
        last_txids.append(after.txid)
        time.sleep(min(0.001 * (attempt + 1), 0.02))
    raise DatabaseBusyError(
        f"{path}: database changed during each of {attempts} read attempts (txid now {last_txids[-1]})"
    )

"""The one typed model of an eStargz table of contents (`stargz.index.json`).

Every consumer (the RAFS builder, `stargzfs toc`, materialize) reads TOCs through
`parse_toc`, so the rules of estargz.md §A3/§A8 live in exactly one place. msgspec decodes
the JSON straight into `Entry` structs in C, checking every type as it goes (unknown keys
skipped, wrong types, negative and beyond-int64 integers refused); one linear pass then
normalises them in place: names cleaned like upstream `cleanEntryName`, mode masked to
0o7777 with the type taken from `type`, `chunk` records attached to their file,
`userName`/`groupName` filled from first use, names checked against PATH_MAX and a depth
limit. Implicit parent directories appear in `Toc.by_name`, built on first use. The raw
bytes are kept so `stargz.index.json` can be written verbatim (its sha256 is the TOC digest).

Every failure is a FormatError (exit 5) of one line that names the entry index and name;
never another exception, whatever the bytes.
"""

from __future__ import annotations

import calendar
import functools
import mmap
import posixpath
import re
import stat
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

import msgspec

from stargzfs.digest import sha256_digest
from stargzfs.errors import FormatError, StargzfsError
from stargzfs.gcpause import paused_gc

TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
#: Root-level names a TOC-derived filesystem hides (stargz-snapshotter does the same).
HIDDEN_ROOT_NAMES = frozenset({TOC_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})

ENTRY_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")
TYPE_BITS = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "hardlink": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "char": stat.S_IFCHR,
    "block": stat.S_IFBLK,
    "fifo": stat.S_IFIFO,
}
#: Longest cleaned name (Linux PATH_MAX) and deepest one, in components, we accept. Deeper
#: or longer names cannot be created through one path on Linux; refusing them bounds the
#: work per name (every implicit parent of a name is a string of its own).
MAX_NAME_BYTES = 4096
MAX_NAME_DEPTH = 1024
INT64_MAX = (1 << 63) - 1
_SHOWN_NAME = 100  # characters of a name quoted in an error message

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)
_ENTRY_PATH = re.compile(r"\$\.entries\[(\d+)\]\.?(.*)")

#: JSON integers of the TOC: Go writes int64; negative values make no sense in any field.
Count = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
NO_CHUNKS: tuple[()] = ()  # shared by every entry without data
NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})


class Chunk(msgspec.Struct, gc=False):
    """One compressed record holding `[chunk_offset, chunk_offset+size)` of a file."""

    offset: int  # compressed offset of the gzip member / zstd frame that starts it
    chunk_offset: int  # offset of this chunk inside the uncompressed file
    size: int  # uncompressed length, resolved (never 0)
    digest: str | None  # `chunkDigest`, "sha256:<hex>" when present
    inner_offset: int = 0  # uncompressed skip inside the member (estargz >= 0.13)
    raw_index: int = 0  # index of the record in the TOC's `entries` array


class _Normalised:
    """Entry state that has no JSON key: plain slots, so no TOC can set them. `parse_toc`
    fills all of them for every entry it returns."""

    __slots__ = ("mtime", "mtime_nsec", "chunks", "raw_index")
    mtime: int  # seconds since the epoch, from `modtime`
    mtime_nsec: int
    chunks: list[Chunk] | tuple[()]  # regular files with data: their chunks, else NO_CHUNKS
    raw_index: int  # index in the TOC's `entries` array (-1 when implicit)

    @property
    def implicit(self) -> bool:
        """A parent directory the TOC implies but does not list."""
        return self.raw_index < 0


class EntryCore(_Normalised, msgspec.Struct, kw_only=True, gc=False):
    """One TOC record as decoded, normalised in place by `parse_toc`: `name` cleaned ("" is
    the root), `mode` holds permission bits only, `size` is 0 unless `reg`, `link_name` is
    the verbatim symlink target or the cleaned hardlink target. The chunk fields keep the
    record's own values; `chunks` has the resolved ones.

    Everything but the digests: what the builder decodes (`parse_toc(digests=False)`), so
    a million-entry TOC does not hold two million digest strings it never reads.
    """

    type: Literal["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"]
    name: str = ""
    mode: Count = 0
    uid: Count = 0
    gid: Count = 0
    user_name: str = msgspec.field(default="", name="userName")
    group_name: str = msgspec.field(default="", name="groupName")
    size: Count = 0
    modtime: str = ""
    link_name: str = msgspec.field(default="", name="linkName")
    dev_major: Count = msgspec.field(default=0, name="devMajor")
    dev_minor: Count = msgspec.field(default=0, name="devMinor")
    xattrs: Mapping[str, bytes] = NO_XATTRS  # values decoded from base64 by msgspec
    offset: Count = 0
    chunk_offset: Count = msgspec.field(default=0, name="chunkOffset")
    chunk_size: Count = msgspec.field(default=0, name="chunkSize")
    inner_offset: Count = msgspec.field(default=0, name="innerOffset")

    @property
    def st_mode(self) -> int:
        return TYPE_BITS[self.type] | self.mode

    @property
    def parent(self) -> str:
        return posixpath.dirname(self.name)

    @property
    def basename(self) -> str:
        return posixpath.basename(self.name)


class Entry(EntryCore, kw_only=True, gc=False):
    """A TOC record with its digests (see EntryCore)."""

    digest: str | None = None  # whole-file "sha256:<hex>"; "" becomes None
    chunk_digest: str = msgspec.field(default="", name="chunkDigest")


class _Document(msgspec.Struct):
    version: Any = None  # checked after decoding, so its message can quote the value
    entries: list[Entry] | None = None


class _CoreDocument(msgspec.Struct):
    version: Any = None
    entries: list[EntryCore] | None = None


class _NameOnly(msgspec.Struct):
    name: Any = None


class _VersionOnly(msgspec.Struct):
    version: Any = None


_DECODERS = {True: msgspec.json.Decoder(_Document), False: msgspec.json.Decoder(_CoreDocument)}
_SYNTAX = msgspec.json.Decoder(msgspec.Raw)  # checks JSON syntax, builds nothing
_RAW_ENTRIES = msgspec.json.Decoder(msgspec.defstruct("_RawEntries", [("entries", list[msgspec.Raw], [])]))
_NAME_ONLY = msgspec.json.Decoder(_NameOnly)
_VERSION_ONLY = msgspec.json.Decoder(_VersionOnly)


class Toc:
    """A parsed TOC: entries in TOC order (chunk records attached, duplicates kept)."""

    __slots__ = ("version", "entries", "raw", "has_root_entry", "_digest", "_by_name")

    def __init__(self, entries: list[EntryCore], raw: bytes, has_root_entry: bool) -> None:
        self.version = 1
        self.entries = entries  # Entry objects unless parsed with digests=False
        self.raw = raw  # the exact JSON bytes
        self.has_root_entry = has_root_entry
        self._digest: str | None = None
        self._by_name: dict[str, EntryCore] | None = None

    @property
    def digest(self) -> str:
        """"sha256:<hex>" of `raw`, computed on first use (the builder never asks)."""
        if self._digest is None:
            self._digest = sha256_digest(self.raw)
        return self._digest

    @property
    def by_name(self) -> dict[str, EntryCore]:
        """Name → entry (last wins), plus the root and every implicit parent directory.

        Built on first use and kept; the builder never needs it (implicit parents cost a
        string per directory level, which is why names are depth-limited).
        """
        if self._by_name is None:
            self._by_name = _index(self.entries)
        return self._by_name

    def get(self, name: str) -> EntryCore | None:
        return self.by_name.get(clean_name(name))

    def forget_index(self) -> None:
        """Drop `by_name` (rebuilt on next use) so consumed entries can be freed."""
        self._by_name = None


def clean_name(name: str) -> str:
    """Upstream cleanEntryName: path.Clean("/"+name) without the leading "/"."""
    # Fast path for names that are clean once a "./" or "/" prefix and trailing slashes
    # are gone (nearly all: TOCs hold up to millions of them); anything with "//", a
    # component starting with "." or a leading "." or "/" left goes through normpath.
    stripped = name[2:] if name.startswith("./") else name.lstrip("/")
    if stripped.endswith("/"):
        stripped = stripped.rstrip("/")
    if "//" not in stripped and "/." not in stripped and not stripped.startswith((".", "/")):
        return stripped
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return "" if cleaned == "." else cleaned


@functools.lru_cache(maxsize=4096)
def parse_rfc3339(value: str) -> tuple[int, int]:
    """RFC 3339 (Go writes seconds, containers/storage nanoseconds) → (seconds, nsec)."""
    match = _RFC3339.match(value.strip())
    if not match:
        raise ValueError(f"not an RFC 3339 time: {_shorten(value)!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    frac, zone = match.group(7), match.group(8)
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"not an RFC 3339 time: {_shorten(value)!r} ({exc})") from None
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    nsec = int((frac or "0")[:9].ljust(9, "0"))
    return seconds, nsec


def _shorten(value: object) -> object:
    """Long strings cut for error messages (a TOC name can be megabytes long)."""
    if isinstance(value, str) and len(value) > _SHOWN_NAME:
        return value[:_SHOWN_NAME] + "…"
    return value


def _where(index: int, name: object) -> str:
    """Names an entry in error messages; built only when there is an error."""
    if name is None:
        return f"entry #{index}"
    return f"entry #{index} ({_shorten(name)!r})"


def parse_toc(raw: bytes | mmap.mmap, *, digests: bool = True, keep_raw: bool = True) -> Toc:
    """Decode and normalise TOC JSON bytes; a FormatError names the entry.

    `digests=False` (the builder) decodes EntryCore records: no `digest`/`chunkDigest`
    strings, `Chunk.digest` None, and `modtime` strings dropped once parsed.
    `keep_raw=False` leaves `Toc.raw` empty (no `stargz.index.json` to write, no digest
    to ask for): `raw` may then be a mapping of the file, which is never copied.
    """
    with paused_gc():
        records = _decode(raw, digests)
        entries, has_root = _normalise(records, digests)
        del records
        return Toc(entries, bytes(raw) if keep_raw else b"", has_root)


def _decode(raw: bytes | mmap.mmap, digests: bool) -> list[EntryCore]:
    """JSON → Entry structs; msgspec's own errors become one-line FormatErrors."""
    try:
        document = _DECODERS[digests].decode(raw)
    except msgspec.ValidationError as exc:
        raise _explain(raw, str(exc)) from None
    except msgspec.DecodeError as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from None
    except RecursionError:
        raise FormatError("TOC is not valid JSON: nested too deeply") from None
    version = document.version
    if type(version) is not int or version != 1:
        raise FormatError(f"TOC version must be 1, got {_shorten(repr(version))}")
    return document.entries or []


def _explain(raw: bytes | mmap.mmap, message: str) -> StargzfsError:
    """A msgspec ValidationError (`<what> - at `$.entries[3].size``) as our error naming the
    entry. Syntax errors anywhere win, then a wrong version, as they would for a parser that
    reads the whole document before looking at it."""
    try:
        _SYNTAX.decode(raw)
    except msgspec.DecodeError as exc:
        return FormatError(f"TOC is not valid JSON: {exc}")
    except RecursionError:
        return FormatError("TOC is not valid JSON: nested too deeply")
    what, at, path = message.rpartition(" - at `")
    if not at:  # msgspec names no path for the document itself
        return FormatError(f"TOC must be a JSON object: {message}")
    path = path.rstrip("`")
    try:
        version = _VERSION_ONLY.decode(raw).version
    except msgspec.ValidationError:  # the version itself is what failed (e.g. 5,000 digits)
        version = 1
    if type(version) is not int or version != 1:
        return FormatError(f"TOC version must be 1, got {_shorten(repr(version))}")
    match = _ENTRY_PATH.fullmatch(path)
    if match is None:
        return FormatError(f"TOC {path.removeprefix('$.')!r}: {what}")
    index, key = int(match.group(1)), match.group(2)
    where = _where(index, _entry_name(raw, index))
    if key == "type" and what.startswith("Invalid enum value"):
        return FormatError(f"TOC {where}: unknown entry type{what.removeprefix('Invalid enum value')}")
    return FormatError(f"TOC {where}: {key!r}: {what}" if key else f"TOC {where}: {what}")


def _entry_name(raw: bytes | mmap.mmap, index: int) -> object:
    """The `name` of record `index`, for an error message (None when it has none)."""
    try:
        record = _RAW_ENTRIES.decode(raw).entries[index]
        return _NAME_ONLY.decode(record).name
    except (msgspec.MsgspecError, IndexError, RecursionError):
        return None


def _normalise(records: list[EntryCore], digests: bool) -> tuple[list[EntryCore], bool]:
    """One pass in TOC order: chunk records attached to their file and dropped, every other
    record normalised in place (see EntryCore). Returns the entries and whether the TOC has
    a root entry."""
    entries: list[EntryCore] = []
    append = entries.append
    owners = _Owners()
    has_root = False
    last_reg: EntryCore | None = None
    rfc3339 = parse_rfc3339
    last_modtime, last_times = "", (0, 0)  # TOCs repeat one modtime: skip even the cache lookup
    # The loop runs once per entry of up to millions: the common cases of clean_name and
    # _attach_chunk are inlined (each call cost ~0.1 µs); anything else goes through them.
    for index, entry in enumerate(records):
        kind = entry.type
        if kind == "chunk":
            _attach_chunk(last_reg, entry, index, digests)
            continue
        entry.raw_index = index
        entry.chunks = NO_CHUNKS
        name = entry.name
        if name.startswith(("./", "/", ".")) or name.endswith("/") or "//" in name or "/." in name:
            name = entry.name = clean_name(name)  # else clean_name would return it unchanged
        if len(name) > MAX_NAME_BYTES // 4:
            _check_long_name(name, index)
        if not name:
            has_root = _is_root_dir(entry, index)
        if entry.mode > 0o7777:
            entry.mode &= 0o7777
        modtime = entry.modtime
        if modtime:
            if modtime != last_modtime:
                try:
                    last_times = rfc3339(modtime)
                except ValueError as exc:
                    raise FormatError(f"TOC {_where(index, name)}: {exc}") from None
                last_modtime = modtime
            entry.mtime, entry.mtime_nsec = last_times
            if not digests:
                entry.modtime = ""
        else:
            entry.mtime = entry.mtime_nsec = 0
        if entry.user_name or entry.group_name or owners.known:
            owners.fill(entry)
        if kind == "reg":
            last_reg = entry
            size = entry.size
            if size:
                if entry.chunk_offset or (entry.chunk_size and entry.chunk_size != size):
                    _attach_chunk(entry, entry, index, digests)
                else:  # one chunk of the whole file: what _attach_chunk makes, without the checks it needs
                    digest = (entry.chunk_digest or None) if digests else None  # type: ignore[attr-defined]
                    entry.chunks = [Chunk(entry.offset, 0, size, digest, entry.inner_offset, index)]
        else:
            last_reg = None
            if entry.size:
                entry.size = 0
            if kind == "hardlink":
                entry.link_name = _hardlink_target(entry, index)
            elif entry.link_name and kind != "symlink":
                entry.link_name = ""
        if digests and not entry.digest:  # type: ignore[attr-defined]  # an Entry when digests
            entry.digest = None  # type: ignore[attr-defined]
        append(entry)
    return entries, has_root


def _is_root_dir(entry: EntryCore, index: int) -> bool:
    if entry.type != "dir":
        raise FormatError(f"TOC {_where(index, entry.name)}: the root entry must be a directory")
    return True


class _Owners:
    """`userName`/`groupName` appear only on the first entry with a given uid/gid (§A3):
    remember them and fill them in on later entries."""

    __slots__ = ("users", "groups", "known")

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}
        self.known = False

    def fill(self, entry: EntryCore) -> None:
        if entry.user_name:
            self.users.setdefault(entry.uid, entry.user_name)
        elif self.users:
            entry.user_name = self.users.get(entry.uid, "")
        if entry.group_name:
            self.groups.setdefault(entry.gid, entry.group_name)
        elif self.groups:
            entry.group_name = self.groups.get(entry.gid, "")
        self.known = bool(self.users or self.groups)


def _attach_chunk(owner: EntryCore | None, record: EntryCore, index: int, digests: bool) -> None:
    """Resolve a record's chunk (chunkSize 0 = to the end of the file) and append it."""
    if owner is None:
        raise FormatError(f"TOC {_where(index, record.name)}: 'chunk' record without a preceding 'reg' file")
    chunk_offset = record.chunk_offset
    # `size - 0` would be a new int object per file: the file's own is shared (1M-entry memory)
    size = record.chunk_size or (owner.size - chunk_offset if chunk_offset else owner.size)
    if size <= 0 or chunk_offset + size > owner.size:
        raise FormatError(
            f"TOC {_where(index, record.name)}: chunk [{chunk_offset}, {chunk_offset + size}) lies outside "
            f"{_shorten(owner.name)!r} of size {owner.size}"
        )
    digest = (record.chunk_digest or None) if digests else None  # type: ignore[attr-defined]
    chunk = Chunk(record.offset, chunk_offset, size, digest, record.inner_offset, index)
    if owner.chunks:
        owner.chunks.append(chunk)  # type: ignore[union-attr]  # a list once it has a chunk
    else:
        owner.chunks = [chunk]


def _hardlink_target(entry: EntryCore, index: int) -> str:
    """Hardlink targets are archive paths (cleaned); symlink targets stay verbatim."""
    if not entry.link_name:
        raise FormatError(f"TOC {_where(index, entry.name)}: hardlink without 'linkName'")
    target = clean_name(entry.link_name)
    if len(target) > MAX_NAME_BYTES // 4:
        _check_long_name(target, index, "hardlink target")
    return target


def _check_long_name(name: str, index: int, what: str = "name") -> None:
    """PATH_MAX and depth limits; only names of over 1024 characters can break them.

    Malformed (exit 5), not unsupported: no filesystem, hence no honest layer, has such a
    path, and the mount must answer EIO for it rather than "no bootstrap".
    """
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise FormatError(
            f"TOC {_where(index, name)}: {what} is {size} bytes long, over PATH_MAX ({MAX_NAME_BYTES})"
        )
    depth = name.count("/") + 1
    if depth > MAX_NAME_DEPTH:
        raise FormatError(
            f"TOC {_where(index, name)}: {what} has {depth} components, over the limit of {MAX_NAME_DEPTH}"
        )


def _implicit_dir(name: str) -> Entry:
    entry = Entry(type="dir", name=name, mode=0o755)
    entry.mtime = entry.mtime_nsec = 0
    entry.chunks = NO_CHUNKS
    entry.raw_index = -1
    return entry


def _index(entries: list[EntryCore]) -> dict[str, EntryCore]:
    """Name → entry (last wins), plus the root and every implicit parent directory."""
    by_name: dict[str, EntryCore] = {}
    for entry in entries:
        by_name[entry.name] = entry
    if "" not in by_name:
        by_name[""] = _implicit_dir("")
    for name in list(by_name):
        # cleaned names have no leading, trailing or doubled "/": rpartition is dirname
        parent = name.rpartition("/")[0]
        while name and parent not in by_name:
            by_name[parent] = _implicit_dir(parent)
            parent = parent.rpartition("/")[0]
        # a present parent ends the walk: its own ancestors are handled when it is visited
    return by_name

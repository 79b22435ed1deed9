"""The one typed model of an eStargz table of contents (`stargz.index.json`).

Every consumer (the RAFS builder, `stargzfs toc`, the FUSE pipeline) reads TOCs through
`parse_toc`, so the normalisation rules of estargz.md §A3/§A8 live in exactly one place:
names cleaned like upstream `cleanEntryName`, mode masked to 0o7777 with the type taken
from `type`, `chunk` records attached to their file, `userName`/`groupName` filled from
first use, implicit parent directories synthesised, unknown keys ignored. The raw bytes
are kept so `stargz.index.json` can be written verbatim (its sha256 is the TOC digest).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import functools
import json
import posixpath
import re
import stat
from dataclasses import dataclass, field

from stargzfs.digest import sha256_digest
from stargzfs.errors import FormatError
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

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)


@dataclass(slots=True)
class Chunk:
    """One compressed record holding `[chunk_offset, chunk_offset+size)` of a file."""

    offset: int  # compressed offset of the gzip member / zstd frame that starts it
    chunk_offset: int  # offset of this chunk inside the uncompressed file
    size: int  # uncompressed length, resolved (never 0)
    digest: str | None  # `chunkDigest`, "sha256:<hex>" when present
    inner_offset: int = 0  # uncompressed skip inside the member (estargz >= 0.13)
    raw_index: int = 0  # index of the record in the TOC's `entries` array


@dataclass(slots=True)
class Entry:
    """A non-chunk TOC record with its chunks attached (regular files only)."""

    name: str  # normalised: "" is the root, no leading or trailing "/"
    type: str  # one of ENTRY_TYPES
    mode: int  # permission bits incl. setuid/setgid/sticky (masked to 0o7777)
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    size: int = 0
    mtime: int = 0  # seconds since the epoch
    mtime_nsec: int = 0
    link_name: str = ""  # symlink: verbatim target; hardlink: normalised target path
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str | None = None
    chunks: list[Chunk] = field(default_factory=list)
    implicit: bool = False  # synthesised parent directory, not in the TOC
    raw_index: int = -1  # index in the TOC's `entries` array (-1 when implicit)

    @property
    def st_mode(self) -> int:
        return TYPE_BITS[self.type] | self.mode

    @property
    def parent(self) -> str:
        return posixpath.dirname(self.name)

    @property
    def basename(self) -> str:
        return posixpath.basename(self.name)


@dataclass(slots=True)
class Toc:
    version: int
    entries: list[Entry]  # TOC order, chunks attached, duplicates kept
    raw: bytes  # the exact JSON bytes
    digest: str  # "sha256:<hex>" of `raw`
    has_root_entry: bool
    by_name: dict[str, Entry]  # last occurrence wins; root and implicit parents included

    def get(self, name: str) -> Entry | None:
        return self.by_name.get(clean_name(name))


def clean_name(name: str) -> str:
    """Upstream cleanEntryName: path.Clean("/"+name) without the leading "/"."""
    # Fast path for the common GNU-tar form ("./a/b", "./dir/"): already clean once the
    # prefix and trailing slash are gone. TOCs hold up to millions of names.
    stripped = name[2:] if name.startswith("./") else name.lstrip("/")
    stripped = stripped.rstrip("/")
    if (
        "//" not in stripped
        and ".." not in stripped
        and "/./" not in stripped
        and not stripped.startswith("./")
        and not stripped.endswith("/.")
        and not stripped.startswith("/")
        and stripped != "."
    ):
        return stripped
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return "" if cleaned == "." else cleaned


@functools.lru_cache(maxsize=4096)
def parse_rfc3339(value: str) -> tuple[int, int]:
    """RFC 3339 (Go writes seconds, containers/storage nanoseconds) → (seconds, nsec)."""
    match = _RFC3339.match(value.strip())
    if not match:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    frac, zone = match.group(7), match.group(8)
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    nsec = int((frac or "0")[:9].ljust(9, "0"))
    return seconds, nsec


def _where(index: int, rec: dict) -> str:
    """Names an entry in error messages; built only when there is an error (hot loop)."""
    return f"entry #{index} ({rec.get('name', '')!r})"


def _int(obj: dict, key: str, index: int) -> int:
    value = obj.get(key, 0)
    if type(value) is int and value >= 0:
        return value
    where = _where(index, obj)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"TOC {where}: {key!r} must be an integer, got {value!r}")
    if value < 0:
        raise FormatError(f"TOC {where}: {key!r} must not be negative, got {value}")
    return value


def _str(obj: dict, key: str, index: int) -> str:
    value = obj.get(key, "")
    if type(value) is str:
        return value
    where = _where(index, obj)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FormatError(f"TOC {where}: {key!r} must be a string, got {value!r}")
    return value


def _xattrs(obj: dict, index: int) -> dict[str, bytes]:
    raw = obj.get("xattrs")
    if not raw:
        return {}
    where = _where(index, obj)
    if not isinstance(raw, dict):
        raise FormatError(f"TOC {where}: 'xattrs' must be an object")
    out: dict[str, bytes] = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            raise FormatError(f"TOC {where}: xattr {key!r} must be a base64 string")
        try:
            out[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(f"TOC {where}: xattr {key!r} is not valid base64") from None
    return out


def parse_toc(raw: bytes) -> Toc:
    """Parse and normalise TOC JSON bytes; FormatError names the offending entry."""
    with paused_gc():
        return _parse_toc(raw)


def _parse_toc(raw: bytes) -> Toc:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FormatError("TOC must be a JSON object")
    version = doc.get("version")
    if version != 1:
        raise FormatError(f"TOC version must be 1, got {version!r}")
    records = doc.pop("entries", None)
    del doc
    if records is None:
        records = []
    if not isinstance(records, list):
        raise FormatError("TOC 'entries' must be an array")
    entries, has_root = _entries(records)
    return Toc(
        version=1,
        entries=entries,
        raw=bytes(raw),
        digest=sha256_digest(raw),
        has_root_entry=has_root,
        by_name=_index(entries),
    )


def _entries(records: list) -> tuple[list[Entry], bool]:
    """Records → entries; each record is released once read, so the JSON tree and the
    entries never both exist in full (that peak decides the builder's RSS).

    The inline type checks are a fast path only: a record that fails any of them goes
    through `_slow_entry` / `_attach_chunk`, which raise the precise error (or accept
    JSON nulls) exactly as the per-field helpers always did.
    """
    entries: list[Entry] = []
    append = entries.append
    user_names: dict[int, str] = {}
    group_names: dict[int, str] = {}
    has_root = False
    last_reg: Entry | None = None
    type_bits = TYPE_BITS
    for index, rec in enumerate(records):
        records[index] = None
        if type(rec) is not dict:
            raise FormatError(f"TOC entry #{index} is not an object")
        get = rec.get
        raw_name = get("name", "")
        kind = get("type", "")
        if type(raw_name) is not str or type(kind) is not str:
            raw_name = _str(rec, "name", index)
            kind = _str(rec, "type", index)
        if kind == "chunk":
            if last_reg is None:
                raise FormatError(f"TOC {_where(index, rec)}: 'chunk' record without a preceding 'reg' file")
            _attach_chunk(last_reg, rec, index)
            continue
        if kind not in type_bits:
            raise FormatError(f"TOC {_where(index, rec)}: unknown entry type {kind!r}")
        name = clean_name(raw_name)
        mode = get("mode", 0)
        uid = get("uid", 0)
        gid = get("gid", 0)
        user_name = get("userName", "")
        group_name = get("groupName", "")
        size = get("size", 0) if kind == "reg" else 0
        dev_major = get("devMajor", 0)
        dev_minor = get("devMinor", 0)
        digest = get("digest", "")
        modtime = get("modtime", "")
        link = get("linkName", "")
        if not (
            type(mode) is int and type(uid) is int and type(gid) is int and type(size) is int
            and type(dev_major) is int and type(dev_minor) is int
            and (mode | uid | gid | size | dev_major | dev_minor) >= 0
            and type(user_name) is str and type(group_name) is str and type(digest) is str
            and type(modtime) is str and type(link) is str
        ):
            entry = _slow_entry(rec, index, name, kind)
            size, user_name, group_name = entry.size, entry.user_name, entry.group_name
        else:
            xattrs = _xattrs(rec, index) if get("xattrs") else {}
            mtime = mtime_nsec = 0
            if modtime:
                try:
                    mtime, mtime_nsec = parse_rfc3339(modtime)
                except ValueError as exc:
                    raise FormatError(f"TOC {_where(index, rec)}: {exc}") from None
            entry = Entry(
                name, kind, mode & 0o7777, uid, gid, user_name, group_name, size, mtime, mtime_nsec, "",
                dev_major, dev_minor, xattrs, digest or None, [], False, index,
            )
            entry.link_name = _link_name(kind, link, index, rec)
        if user_name:
            user_names.setdefault(entry.uid, user_name)
        elif user_names:
            entry.user_name = user_names.get(entry.uid, "")
        if group_name:
            group_names.setdefault(entry.gid, group_name)
        elif group_names:
            entry.group_name = group_names.get(entry.gid, "")
        if kind == "reg":
            last_reg = entry
            chunk_offset = get("chunkOffset", 0)
            chunk_size = get("chunkSize", 0)
            offset = get("offset", 0)
            inner_offset = get("innerOffset", 0)
            chunk_digest = get("chunkDigest", "")
            if not (
                type(chunk_offset) is int and type(chunk_size) is int and type(offset) is int
                and type(inner_offset) is int and (chunk_offset | chunk_size | offset | inner_offset) >= 0
                and type(chunk_digest) is str
            ):
                _attach_chunk(entry, rec, index)
            elif size:
                chunk_size = chunk_size or size - chunk_offset
                if chunk_size <= 0 or chunk_offset + chunk_size > size:
                    _attach_chunk(entry, rec, index)  # raises the out-of-bounds error
                else:
                    entry.chunks.append(
                        Chunk(offset, chunk_offset, chunk_size, chunk_digest or None, inner_offset, index)
                    )
        else:
            last_reg = None
        if not name:
            if kind != "dir":
                raise FormatError(f"TOC {_where(index, rec)}: the root entry must be a directory")
            has_root = True
        append(entry)
    return entries, has_root


def _slow_entry(rec: dict, index: int, name: str, kind: str) -> Entry:
    """One record through the per-field helpers: precise errors, JSON nulls as defaults."""
    entry = Entry(
        name=name,
        type=kind,
        mode=_int(rec, "mode", index) & 0o7777,
        uid=_int(rec, "uid", index),
        gid=_int(rec, "gid", index),
        user_name=_str(rec, "userName", index),
        group_name=_str(rec, "groupName", index),
        size=_int(rec, "size", index) if kind == "reg" else 0,
        dev_major=_int(rec, "devMajor", index),
        dev_minor=_int(rec, "devMinor", index),
        xattrs=_xattrs(rec, index),
        digest=_str(rec, "digest", index) or None,
        raw_index=index,
    )
    modtime = _str(rec, "modtime", index)
    if modtime:
        try:
            entry.mtime, entry.mtime_nsec = parse_rfc3339(modtime)
        except ValueError as exc:
            raise FormatError(f"TOC {_where(index, rec)}: {exc}") from None
    entry.link_name = _link_name(kind, _str(rec, "linkName", index), index, rec)
    return entry


def _link_name(kind: str, link: str, index: int, rec: dict) -> str:
    """Hardlink targets are archive paths (cleaned); symlink targets stay verbatim."""
    if kind == "hardlink":
        if not link:
            raise FormatError(f"TOC {_where(index, rec)}: hardlink without 'linkName'")
        return clean_name(link)
    return link if kind == "symlink" else ""


def _attach_chunk(owner: Entry, rec: dict, index: int) -> None:
    chunk_offset = _int(rec, "chunkOffset", index)
    size = _int(rec, "chunkSize", index) or owner.size - chunk_offset
    if rec.get("type") == "reg" and owner.size == 0:
        return  # empty file: no data, no offset
    if size <= 0 or chunk_offset + size > owner.size:
        raise FormatError(
            f"TOC {_where(index, rec)}: chunk [{chunk_offset}, {chunk_offset + size}) lies outside "
            f"{owner.name!r} of size {owner.size}"
        )
    owner.chunks.append(
        Chunk(
            offset=_int(rec, "offset", index),
            chunk_offset=chunk_offset,
            size=size,
            digest=_str(rec, "chunkDigest", index) or None,
            inner_offset=_int(rec, "innerOffset", index),
            raw_index=index,
        )
    )


def _index(entries: list[Entry]) -> dict[str, Entry]:
    """Name → entry (last wins), plus the root and every implicit parent directory."""
    by_name: dict[str, Entry] = {}
    for entry in entries:
        by_name[entry.name] = entry
    if "" not in by_name:
        by_name[""] = Entry(name="", type="dir", mode=0o755, implicit=True)
    for name in list(by_name):
        # cleaned names have no leading, trailing or doubled "/": rpartition is dirname
        parent = name.rpartition("/")[0]
        while name and parent not in by_name:
            by_name[parent] = Entry(name=parent, type="dir", mode=0o755, implicit=True)
            parent = parent.rpartition("/")[0]
        # a present parent ends the walk: its own ancestors are handled when it is visited
    return by_name

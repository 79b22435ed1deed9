"""containerd's snapshot metadata schema (snapshots/storage/bolt.go) on top of the bbolt reader.

Decodes ROOT/metadata.db into immutable Snapshot records: uvarint ids, zig-zag
usage, Go binary timestamps, the ParentIDs chain (immediate parent first) and the
`parents` child index. Labels may hold registry credentials (pullsecret), so they
never appear in a repr or an error message.
"""

from __future__ import annotations

import os
import struct
import threading
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from stargzfs.digest import sha256_hex_of
from stargzfs.errors import FormatError, StargzfsError, UnsupportedError
from stargzfs.snapshots import bolt

LABEL_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
LABEL_TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
LABEL_STARGZ = "containerd.io/snapshot/stargz"
LABEL_TARGET_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_PULL_USERNAME = "containerd.io/snapshot/pullusername"
LABEL_PULL_SECRET = "containerd.io/snapshot/pullsecret"
LABEL_NYDUS_DATA_LAYER = "containerd.io/snapshot/nydus-blob"
LABEL_NYDUS_META_LAYER = "containerd.io/snapshot/nydus-bootstrap"
LABEL_NYDUS_REF_LAYER = "containerd.io/snapshot/nydus-ref"
LABEL_NYDUS_TARFS_LAYER = "containerd.io/snapshot/nydus-tarfs"
LABEL_NYDUS_PROXY_MODE = "containerd.io/snapshot/nydus-proxy-mode"
LABEL_NYDUS_SIGNATURE = "containerd.io/snapshot/nydus-signature"
LABEL_NYDUS_IMAGE_BLOCK = "containerd.io/snapshot/nydus-image-block"
LABEL_NYDUS_LAYER_BLOCK = "containerd.io/snapshot/nydus-layer-block"
LABEL_TARFS_HINT = "containerd.io/snapshot/tarfs-hint"

KINDS = {1: "view", 2: "active", 3: "committed"}
GO_EPOCH_TO_UNIX = 62135596800  # seconds from 0001-01-01 to 1970-01-01
_UTC = timezone.utc
_GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=_UTC)
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=_UTC)

# Checked in upstream's chooseProcessor order: proxy, nydus meta, nydus data, then default.
_NON_STARGZ_LAYER_LABELS = (
    (LABEL_NYDUS_PROXY_MODE, "nydus proxy layer"),
    (LABEL_NYDUS_META_LAYER, "nydus meta (bootstrap) layer"),
    (LABEL_NYDUS_DATA_LAYER, "nydus data layer"),
    (LABEL_NYDUS_TARFS_LAYER, "nydus tarfs layer"),
)


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    kind: str
    parent: str | None
    parent_ids: tuple[str, ...]
    labels: Mapping[str, str] = field(repr=False)
    created: datetime
    updated: datetime
    size: int
    inodes: int
    created_ns: int = field(default=0, repr=False, compare=False)
    updated_ns: int = field(default=0, repr=False, compare=False)

    @property
    def layer_digest(self) -> str | None:
        return self.labels.get(LABEL_LAYER_DIGEST) or None

    @property
    def layer_hex(self) -> str | None:
        """The 64-hex blob id nydus uses for bootstrap and blob.meta names."""
        return sha256_hex_of(self.labels.get(LABEL_LAYER_DIGEST, ""))

    @property
    def image_ref(self) -> str | None:
        return self.labels.get(LABEL_IMAGE_REF) or None

    @property
    def toc_digest(self) -> str | None:
        return self.labels.get(LABEL_TOC_DIGEST) or None

    @property
    def parent_id(self) -> str | None:
        return self.parent_ids[0] if self.parent_ids else None

    @property
    def pull_credentials(self) -> tuple[str, str] | None:
        """(username, secret) from the pull labels; both must be non-empty, as upstream's FromLabels requires."""
        username = self.labels.get(LABEL_PULL_USERNAME, "")
        secret = self.labels.get(LABEL_PULL_SECRET, "")
        return (username, secret) if username and secret else None

    @property
    def candidate(self) -> LayerCandidate | None:
        """This snapshot as an eStargz conversion candidate, or None (candidate_reason says why)."""
        if candidate_reason(self) is not None:
            return None
        layer_hex = self.layer_hex
        image_ref = self.image_ref
        assert layer_hex is not None and image_ref is not None  # candidate_reason checked both
        return LayerCandidate(self.id, layer_hex, image_ref, self.toc_digest, self.pull_credentials)


@dataclass(frozen=True)
class LayerCandidate:
    """A committed image layer the mount may convert, with every label it needs already checked."""

    snapshot_id: str
    layer_hex: str  # the layer digest's 64 hex digits: bootstrap and blob.meta names
    image_ref: str  # cri.image-ref: which registry and repository serve the blob
    toc_digest: str | None  # stargz/toc.digest: what the TOC must hash to, when the label is set
    pull_credentials: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def layer_digest(self) -> str:
        return f"sha256:{self.layer_hex}"


def candidate_reason(snapshot: Snapshot) -> str | None:
    """None when the snapshot is an eStargz conversion candidate, else why it is not."""
    if snapshot.kind != "committed":
        return f"not committed ({snapshot.kind})"
    for label, what in _NON_STARGZ_LAYER_LABELS:
        if snapshot.labels.get(label):
            return what
    if not snapshot.labels.get(LABEL_IMAGE_REF):
        return f"no {LABEL_IMAGE_REF} label"
    if not snapshot.labels.get(LABEL_LAYER_DIGEST):
        return f"no {LABEL_LAYER_DIGEST} label"
    if snapshot.layer_hex is None:
        return f"{LABEL_LAYER_DIGEST} is not sha256:<64 hex>"
    return None


class SnapshotTable:
    """All snapshots of one consistent read of metadata.db."""

    def __init__(
        self, snapshots: list[Snapshot], *, txid: int, last_id: int, parents_index: list[bytes] | None = None
    ) -> None:
        self.txid = txid
        self.last_id = last_id  # the "snapshots" bucket sequence: highest id ever allocated
        self._snapshots = sorted(snapshots, key=lambda s: int(s.id))
        self._by_id = {s.id: s for s in self._snapshots}
        self._by_name = {s.name: s for s in self._snapshots}
        self._parents_index = parents_index or []
        self._children: dict[str, tuple[str, ...]] | None = None

    def __repr__(self) -> str:
        return f"SnapshotTable(txid={self.txid}, snapshots={len(self._snapshots)})"

    def __len__(self) -> int:
        return len(self._snapshots)

    def all(self) -> list[Snapshot]:
        """Every snapshot, ordered by numeric id."""
        return list(self._snapshots)

    def by_id(self, id: str) -> Snapshot | None:
        return self._by_id.get(id)

    def by_name(self, name: str) -> Snapshot | None:
        return self._by_name.get(name)

    def children(self, id: str) -> tuple[str, ...]:
        """Child ids from the `parents` index, ascending (decoded on first use)."""
        if self._children is None:
            self._children = _decode_parents_index(self._parents_index)
        return self._children.get(id, ())

    def chain(self, id: str) -> list[Snapshot]:
        """The image layers under `id`, base first: the merge order for image.boot.

        A committed snapshot is itself the top layer; for an active/view snapshot the
        layers are its parents. Raises KeyError for an unknown id.
        """
        snapshot = self._by_id[id]
        top_first = [self._by_id[parent] for parent in snapshot.parent_ids]
        if snapshot.kind == "committed":
            top_first.insert(0, snapshot)
        return top_first[::-1]


def decode_uvarint(data: bytes, what: str) -> int:
    """Go binary.Uvarint, but strict: the whole value must be one well-formed varint."""
    if len(data) == 1 and data[0] < 0x80:
        return data[0]
    value = shift = 0
    for index, byte in enumerate(data):
        if index >= 10:
            break
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if index != len(data) - 1:
                raise FormatError(f"{what}: trailing bytes after varint")
            if value >> 64:
                break
            return value
        shift += 7
    raise FormatError(f"{what}: invalid varint {data.hex()}")


def decode_varint(data: bytes, what: str) -> int:
    """Go binary.Varint: zig-zag signed."""
    raw = decode_uvarint(data, what)
    return (raw >> 1) ^ -(raw & 1)


_GO_TIME_V1 = struct.Struct(">BqihB")  # version, seconds since year 1, nanoseconds, zone minutes, (v2 seconds)


def decode_go_time(data: bytes, what: str) -> tuple[datetime, int]:
    """Go time.MarshalBinary (v1, or v2 with zone seconds) → (aware datetime, Unix nanoseconds)."""
    if len(data) == 15 and data[0] == 1:
        _, seconds, nanos, offset_minutes, offset_seconds = _GO_TIME_V1.unpack(data + b"\0")
    elif len(data) == 16 and data[0] == 2:
        _, seconds, nanos, offset_minutes, offset_seconds = _GO_TIME_V1.unpack(data)
    else:
        raise FormatError(f"{what}: not a Go binary time ({len(data)} bytes, version {data[:1].hex()})")
    if not 0 <= nanos < 1_000_000_000:
        raise FormatError(f"{what}: nanoseconds out of range")
    unix_seconds = seconds - GO_EPOCH_TO_UNIX
    unix_ns = unix_seconds * 1_000_000_000 + nanos
    try:
        moment = _UNIX_EPOCH + timedelta(seconds=unix_seconds, microseconds=nanos // 1000)
        if offset_minutes != -1:
            moment = moment.astimezone(timezone(timedelta(minutes=offset_minutes, seconds=offset_seconds)))
    except (OverflowError, ValueError):
        raise FormatError(f"{what}: time out of range") from None
    return moment, unix_ns


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")  # like Go's string(bytes) rendered through JSON


@dataclass
class _Raw:
    id: int
    name: str
    kind: str
    parent: str | None
    labels: Mapping[str, str]
    created: tuple[datetime, int]
    updated: tuple[datetime, int]
    size: int
    inodes: int


_NO_TIME = (_GO_ZERO_TIME, -GO_EPOCH_TO_UNIX * 1_000_000_000)


def _read_snapshot(parent_bucket: bolt.Bucket, key: bytes, header: bytes) -> _Raw:
    name = _text(key)
    try:
        bucket = parent_bucket.open(key, header)
        fields: dict[bytes, bytes] = {}
        labels: dict[str, str] = {}
        for sub_key, value, is_bucket in bucket.entries():
            if not is_bucket:
                fields[sub_key] = value
            elif sub_key == b"labels":
                label_entries = bucket.open(sub_key, value).entries()
                labels = {_text(k): _text(v) for k, v, nested in label_entries if not nested}
        raw_id = fields.get(b"id")
        if raw_id is None:
            raise FormatError("no id")
        kind = fields.get(b"kind", b"")
        created = fields.get(b"createdat")
        updated = fields.get(b"updatedat")
        size = fields.get(b"size")
        inodes = fields.get(b"inodes")
        return _Raw(
            id=decode_uvarint(raw_id, "id"),
            name=name,
            kind=KINDS.get(kind[0], "unknown") if len(kind) == 1 else "unknown",
            parent=_text(fields[b"parent"]) if fields.get(b"parent") else None,
            labels=types.MappingProxyType(labels),
            created=decode_go_time(created, "createdat") if created is not None else _NO_TIME,
            updated=decode_go_time(updated, "updatedat") if updated is not None else _NO_TIME,
            size=decode_varint(size, "size") if size is not None else 0,
            inodes=decode_varint(inodes, "inodes") if inodes is not None else 0,
        )
    except FormatError as exc:
        message = str(exc)
        prefix = f"{parent_bucket.tx.path}: "
        raise FormatError(f"{prefix}snapshot {name!r}: {message.removeprefix(prefix)}") from None


def _parent_ids(
    raw: _Raw, by_name: Mapping[str, _Raw], memo: dict[str, tuple[str, ...]], path: Path
) -> tuple[str, ...]:
    """Follow parent names upward (iteratively: chains can be long, and corrupt ones cyclic)."""
    pending: list[_Raw] = []
    current: _Raw | None = raw
    while current is not None and current.name not in memo:
        if len(pending) > len(by_name):
            raise FormatError(f"{path}: snapshot {raw.name!r}: parent chain loops")
        pending.append(current)
        if current.parent is None:
            current = None
            break
        parent = by_name.get(current.parent)
        if parent is None:
            raise FormatError(f"{path}: snapshot {current.name!r}: parent {current.parent!r} does not exist")
        current = parent
    below: tuple[str, ...] = memo[current.name] if current is not None else ()
    below_id = (str(current.id),) if current is not None else ()
    for item in reversed(pending):
        parent_ids = below_id + below if item.parent is not None else ()
        memo[item.name] = parent_ids
        below, below_id = parent_ids, (str(item.id),)
    return memo[raw.name]


def _read_table(tx: bolt.Tx) -> SnapshotTable:
    root = tx.root()
    version = root.bucket(b"v1")
    if version is None:
        others = [_text(key) for key, _, _ in root.entries()]
        if others:
            raise UnsupportedError(
                f"{tx.path}: unknown snapshot metadata schema (top-level buckets {others[:5]}, expected 'v1')"
            )
        return SnapshotTable([], txid=tx.meta.txid, last_id=0)
    snapshots_bucket = version.bucket(b"snapshots")
    raws = []
    if snapshots_bucket is not None:
        for key, value, is_bucket in snapshots_bucket.entries():
            if is_bucket:
                raws.append(_read_snapshot(snapshots_bucket, key, value))
    by_name = {raw.name: raw for raw in raws}
    seen_ids: dict[int, str] = {}
    for raw in raws:
        if raw.id in seen_ids:
            raise FormatError(f"{tx.path}: snapshots {seen_ids[raw.id]!r} and {raw.name!r} share id {raw.id}")
        seen_ids[raw.id] = raw.name
    memo: dict[str, tuple[str, ...]] = {}
    snapshots = [
        Snapshot(
            id=str(raw.id),
            name=raw.name,
            kind=raw.kind,
            parent=raw.parent,
            parent_ids=_parent_ids(raw, by_name, memo, tx.path),
            labels=raw.labels,
            created=raw.created[0],
            updated=raw.updated[0],
            size=raw.size,
            inodes=raw.inodes,
            created_ns=raw.created[1],
            updated_ns=raw.updated[1],
        )
        for raw in raws
    ]
    parents = version.bucket(b"parents")
    return SnapshotTable(
        snapshots,
        txid=tx.meta.txid,
        last_id=snapshots_bucket.sequence if snapshots_bucket is not None else 0,
        parents_index=[key for key, _, is_bucket in parents.entries() if not is_bucket] if parents else None,
    )


def _decode_parents_index(keys: list[bytes]) -> dict[str, tuple[str, ...]]:
    """The `parents` index: key uvarint(parent) 0x00 uvarint(child), value child name."""
    children: dict[str, list[int]] = {}
    for key in keys:
        parent_len = next((i + 1 for i, byte in enumerate(key) if not byte & 0x80), 0)
        if parent_len == 0 or parent_len >= len(key) or key[parent_len] != 0:
            raise FormatError(f"malformed parents index key {key.hex()}")
        parent = decode_uvarint(key[:parent_len], "parents index key")
        child = decode_uvarint(key[parent_len + 1 :], "parents index key")
        children.setdefault(str(parent), []).append(child)
    return {parent: tuple(str(c) for c in sorted(ids)) for parent, ids in children.items()}


def load_snapshots(db_path: Path, *, stats: dict[str, int] | None = None) -> SnapshotTable:
    """One consistent, lock-free read of a containerd snapshot metadata.db (see bolt.read_consistent)."""
    table, _ = bolt.read_consistent(Path(db_path), _read_table, stats=stats)
    return table


class SnapshotSource:
    """Re-reads metadata.db only when it changed; cheap enough to call per FUSE request.

    The cache key is the file identity plus the committed meta txid (two small preads):
    bbolt rewrites pages in place, so mtime/size alone can miss a commit that lands
    within the same timestamp tick without growing the file.
    """

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._table: SnapshotTable | None = None

    def _current_key(self) -> tuple[int, int, int]:
        try:
            fd = os.open(self.db_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise bolt.DatabaseMissingError(f"{self.db_path}: no such file") from None
        except OSError as exc:
            raise StargzfsError(f"{self.db_path}: cannot open: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            return info.st_dev, info.st_ino, bolt.read_meta(fd, self.db_path).txid
        except OSError as exc:
            raise StargzfsError(f"{self.db_path}: cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)

    def cached(self) -> SnapshotTable | None:
        """The table of the last successful read (never touches the file)."""
        return self._table

    def is_stale(self) -> bool:
        """Whether metadata.db changed since the cached read (two small preads, no lock).

        For callers that must not block (an event loop): they serve `cached()` and call
        `current()` in a worker thread when this says so. A broken file counts as changed.
        """
        try:
            return self._table is None or self._current_key() != self._key
        except StargzfsError:
            return True

    def current(self) -> SnapshotTable:
        """The table for the latest commit; raises StargzfsError subclasses for a bad file.

        If writers kept committing through every read attempt (DatabaseBusyError), the
        previous table is returned instead: stale but consistent, and the next call retries.
        """
        with self._lock:
            key = self._current_key()
            if self._table is None or key != self._key:
                try:
                    table = load_snapshots(self.db_path)
                except bolt.DatabaseBusyError:
                    if self._table is None:
                        raise
                    return self._table
                self._table = table
                self._key = (key[0], key[1], table.txid)
            return self._table

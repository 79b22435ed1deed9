"""Stack layer bootstraps into one, the way overlayfs stacks the layers (rafs-v6 spec §4).

Each source is read back into the shared tree model, its OCI whiteouts are applied to what
the layers below built (`.wh.NAME` removes NAME and its subtree, `.wh..wh..opq` empties the
directory), its blob indexes are renumbered into the merged blob table, and the writer lays
the result out from scratch. Unlike nydus-image v2.1 we also apply the base layer's own
whiteouts (they hide nothing and must not show up), drop the subtree of a directory that a
later file replaces, and start a directory that replaces a file empty — so the merged view
equals a kernel overlayfs of the extracted layers.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from pathlib import Path

import msgspec

from stargzfs.digest import is_layer_hex
from stargzfs.errors import FormatError, UnsupportedError, UsageError
from stargzfs.gcpause import paused_gc
from stargzfs.rafs.reader import BlobPositions, read_bootstrap
from stargzfs.rafs.tree import BlobInfo, Node, RafsImage
from stargzfs.rafs.writer import write_bootstrap

WHITEOUT_PREFIX = b".wh."
#: AUFS meta files (`.wh..wh.plnk`, `.wh..wh.aufs`, …): never applied, never kept (as containerd does)
WHITEOUT_META_PREFIX = b".wh..wh."
OPAQUE_MARKER = b".wh..wh..opq"
#: RAFS v5 superblock: magic "RAFS" (LE u32) at offset 0, fs version at offset 4
_RAFS_V5_HEAD = struct.Struct("<II")
_RAFS_V5_MAGIC = 0x5241_4653
_RAFS_V5_VERSION = 0x500


class MergeResult(msgspec.Struct):
    bootstrap: bytes
    image: RafsImage
    blob_ids: list[str]  # merged blob table, in device order


def source_blob_id(path: Path) -> str:
    """A layer bootstrap is named by its layer digest; that name becomes its blob id."""
    name = Path(path).name
    if not is_layer_hex(name):
        raise UsageError(
            f"source {str(path)!r}: file name must be the 64 lowercase hex digits of its layer digest"
        )
    return name


def read_source(path: Path, blob_positions: BlobPositions | None = None) -> RafsImage:
    """Read and parse one bootstrap; errors name the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read bootstrap {str(path)!r}: {exc.strerror or exc}") from None
    if len(data) >= _RAFS_V5_HEAD.size and _RAFS_V5_HEAD.unpack_from(data) == (_RAFS_V5_MAGIC, _RAFS_V5_VERSION):
        raise UnsupportedError(f"bootstrap {str(path)!r} is RAFS v5 (fs version 5); merge needs fs version 6")
    try:
        return read_bootstrap(data, blob_positions=blob_positions)
    except FormatError as exc:
        raise FormatError(f"bootstrap {str(path)!r} is corrupt: {exc}") from None


def merge_bootstraps(sources: Sequence[Path], *, parent: Path | None = None) -> MergeResult:
    """Sources lowest layer first; `parent` (already merged, blob ids kept) goes below them all.

    Sources are read one at a time and folded in, so only the merged tree stays in memory.
    """
    with paused_gc():
        return _merge(sources, parent)


def _merge(sources: Sequence[Path], parent: Path | None) -> MergeResult:
    if not sources:
        raise UsageError("merge needs at least one source bootstrap")
    stack: list[tuple[Path, str | None]] = [(Path(parent), None)] if parent is not None else []
    stack += [(Path(path), source_blob_id(path)) for path in sources]  # all names checked before any read

    settings = _Settings()
    blobs: list[BlobInfo] = []
    position_of: dict[str, int] = {}
    root: Node | None = None
    for path, name_as_blob_id in stack:
        # the source's blobs join the merged table before its tree is read, so its chunk
        # refs are made with their merged blob indexes
        image = read_source(path, functools.partial(_merge_blob_table, path, name_as_blob_id, blobs, position_of))
        settings.admit(path, image)
        if root is None and name_as_blob_id is None:
            root = image.root  # the parent is an already-merged view: taken as it is
        else:
            _overlay(root.children if root is not None else {}, image.root)
            root = image.root  # the topmost root's attributes win, the children are merged
    assert root is not None
    output = settings.output()
    merged = RafsImage(
        root=root,
        blobs=blobs,
        chunk_size=output.chunk_size,
        compressor=output.compressor,
        digester=output.digester,
        explicit_uid_gid=output.explicit_uid_gid,
        force_has_xattr=True,  # nydus-image v2.1 merge always sets HAS_XATTR
        root_ino=root.nid or 1,  # v2.1 merge: the root keeps its source nid as i_ino
    )
    return MergeResult(write_bootstrap(merged), merged, [blob.blob_id for blob in blobs])


class _SourceSettings(msgspec.Struct, frozen=True):
    """What a source's superblock says about all of its files (no tree: keeps memory flat)."""

    path: Path
    explicit_uid_gid: bool
    digester: str
    compressor: str
    chunk_size: int


class _Settings:
    """Every source must agree on what the output's superblock says about all of them.

    Compressor and chunk size only matter for sources that carry data, so a layer without a
    blob (empty or dirs-only) never conflicts on them.
    """

    def __init__(self) -> None:
        self.first: _SourceSettings | None = None
        self.with_data: _SourceSettings | None = None

    def admit(self, path: Path, image: RafsImage) -> None:
        this = _SourceSettings(path, image.explicit_uid_gid, image.digester, image.compressor, image.chunk_size)
        first = self.first = self.first or this
        if this.explicit_uid_gid != first.explicit_uid_gid:
            having, lacking = (first.path, path) if first.explicit_uid_gid else (path, first.path)
            raise UnsupportedError(
                f"bootstraps disagree on explicit uid/gid: {str(having)!r} stores owners, "
                f"{str(lacking)!r} was built with --repeatable (owners 0)"
            )
        if this.digester != first.digester:
            raise UnsupportedError(
                f"bootstraps disagree on the digester: {str(first.path)!r} uses {first.digester}, "
                f"{str(path)!r} uses {this.digester}"
            )
        if not image.blobs:
            return
        reference = self.with_data = self.with_data or this
        if this.compressor != reference.compressor:
            raise UnsupportedError(
                f"bootstraps disagree on the compressor: {str(reference.path)!r} uses {reference.compressor}, "
                f"{str(path)!r} uses {this.compressor}"
            )
        sizes = {this.chunk_size, *(blob.chunk_size for blob in image.blobs)}
        if sizes != {reference.chunk_size}:
            raise UnsupportedError(
                f"bootstraps disagree on the chunk size: {str(reference.path)!r} uses {reference.chunk_size:#x}, "
                f"{str(path)!r} uses {', '.join(f'{size:#x}' for size in sorted(sizes))}"
            )

    def output(self) -> _SourceSettings:
        """Owners/digester from any source (all equal), compressor/chunk size from the data."""
        assert self.first is not None
        return self.with_data or self.first


def _merge_blob_table(
    path: Path, name_as_blob_id: str | None, blobs: list[BlobInfo], position_of: dict[str, int],
    source_blobs: list[BlobInfo],
) -> list[int]:
    """Append this source's blobs (first-seen order) and return old index → merged index."""
    if name_as_blob_id is not None and len(source_blobs) > 1:
        raise UnsupportedError(
            f"source {str(path)!r} has {len(source_blobs)} blobs; a layer bootstrap has at most one "
            "(pass an already-merged bootstrap as --parent-bootstrap)"
        )
    mapping: list[int] = []
    for blob in source_blobs:
        if name_as_blob_id is not None:
            blob.blob_id = name_as_blob_id
        position = position_of.get(blob.blob_id)
        if position is None:
            position = position_of[blob.blob_id] = len(blobs)
            blobs.append(blob)
        mapping.append(position)
    return mapping


def _overlay(lower: dict[bytes, Node], upper_dir: Node) -> None:
    """Make `upper_dir` show its layer over `lower` (the merged children below it).

    Whiteouts of a layer act only on the layers below it, so all of a directory's
    whiteouts are applied before its own entries go in. `lower` is consumed (reused as the
    merged dict). Iterative, so directory depth is not bounded by Python's recursion limit.
    """
    work: list[tuple[dict[bytes, Node], Node]] = [(lower, upper_dir)]
    while work:
        below, directory = work.pop()
        entries = directory.children
        assert entries is not None
        additions: list[tuple[bytes, Node]] = []
        for name, child in entries.items():
            if not name.startswith(WHITEOUT_PREFIX):
                additions.append((name, child))
            elif name == OPAQUE_MARKER:
                below.clear()
            elif not name.startswith(WHITEOUT_META_PREFIX):
                below.pop(name[len(WHITEOUT_PREFIX):], None)
        for name, child in additions:
            if child.children is not None:
                previous = below.get(name)
                merged_below = previous.children if previous is not None and previous.children is not None else {}
                work.append((merged_below, child))
            below[name] = child  # a file replaces whatever was there, subtree included
        directory.children = below

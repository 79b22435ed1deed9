"""The snapshotter root on disk: every path under ROOT and every name stargzfs writes, once.

nydus-snapshotter's layout (snapshotter.md §5.1): ROOT/metadata.db, one
ROOT/snapshots/<id>/fs dir per snapshot, blob.meta files in ROOT/cache (fusedev) or in the
fs dir (fscache). What the lazy conversion writes there, and the temp names it (and the
builder, through stargzfs.atomicio) use on the way, are defined here so that the writers,
the FUSE view that hides temps and the start-up sweep that removes them cannot disagree.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from stargzfs.atomicio import temp_target
from stargzfs.digest import is_layer_hex
from stargzfs.estargz.toc import TOC_NAME

METADATA_DB = "metadata.db"
SNAPSHOTS_DIR = "snapshots"
FS_DIR = "fs"
CACHE_DIR = "cache"

#: a chain's merged bootstrap, in the top layer snapshot's fs dir
IMAGE_BOOT = "image.boot"
#: the layer's TOC as fetched (its sha256 is the TOC digest), beside the bootstrap
TOC_FILE = TOC_NAME
BLOB_META_SUFFIX = ".blob.meta"

STATE_DIR = "stargzfs"
STATE_FILE = "state.json"
STATE_LOCK = "state.lock"

#: temps of a layer conversion (the daemon's own and the builder's bootstrap output)
CONVERT_TEMP_PREFIX = "converting-stargz"
#: temps of image.boot merges and of outputs copied between snapshots
MERGE_TEMP_PREFIX = "merging-stargz"
OUTPUT_MODE = 0o440  # what the mount publishes: read-only, never group/world readable
_TEMP_PREFIXES = (CONVERT_TEMP_PREFIX, MERGE_TEMP_PREFIX, "." + CONVERT_TEMP_PREFIX, "." + MERGE_TEMP_PREFIX)


def bootstrap_name(layer_hex: str) -> str:
    """A layer's bootstrap is named by its 64-hex layer digest (its blob id)."""
    return layer_hex


def blob_meta_name(layer_hex: str) -> str:
    return f"{layer_hex}{BLOB_META_SUFFIX}"


def chunk_map_name(layer_hex: str) -> str:
    """nydusd's blobcache bitmap beside the cache file `<hex>` (blobcache.md)."""
    return f"{layer_hex}.chunk_map"


def blob_index_name(layer_hex: str) -> str:
    """What lazy serving needs from the TOC (stargzfs.rafs.blobindex), beside the blobcache."""
    return f"{layer_hex}.stargzfs-index"


def layer_output_names(layer_hex: str, *, with_blob_meta: bool) -> list[str]:
    """What one layer conversion leaves in the snapshot's fs dir, the bootstrap (completion) last."""
    names = [TOC_FILE]
    if with_blob_meta:
        names.append(blob_meta_name(layer_hex))
    return [*names, bootstrap_name(layer_hex)]


def fs_dir_parts(snapshot_id: str) -> tuple[str, str, str]:
    """ROOT-relative components of a snapshot's fs dir (opened one by one, never followed)."""
    return (SNAPSHOTS_DIR, snapshot_id, FS_DIR)


def fs_dir(root: Path, snapshot_id: str) -> Path:
    return Path(root).joinpath(*fs_dir_parts(snapshot_id))


def metadata_db(root: Path) -> Path:
    return Path(root) / METADATA_DB


def default_cache_dir(root: Path) -> Path:
    return Path(root) / CACHE_DIR


def state_dir(root: Path) -> Path:
    return Path(root) / STATE_DIR


def convert_temp_name(kind: str = "") -> str:
    return f"{CONVERT_TEMP_PREFIX}{kind}{secrets.token_hex(6)}"


def merge_temp_name() -> str:
    return f"{MERGE_TEMP_PREFIX}{secrets.token_hex(6)}"


def _is_output_name(name: str) -> bool:
    if name in (IMAGE_BOOT, TOC_FILE) or is_layer_hex(name):
        return True
    stem, dot, suffix = name.partition(".")
    return bool(dot) and is_layer_hex(stem) and f".{suffix}" in (BLOB_META_SUFFIX, ".chunk_map", ".stargzfs-index")


def is_temp_name(name: str) -> bool:
    """An in-progress file of ours or of a builder we ran: hidden, and removed at start-up.

    The bundled builder writes its outputs through stargzfs.atomicio, so atomicio's temp of
    one of our output names counts too; a user's file that merely looks similar does not.
    """
    if name.startswith(_TEMP_PREFIXES):
        return True
    target = temp_target(name)
    return target is not None and (target.startswith(_TEMP_PREFIXES) or _is_output_name(target))

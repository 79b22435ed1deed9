"""`stargzfs status ROOT [--json]`: what the snapshotter root looks like to stargzfs.

One row per snapshot in ROOT/metadata.db (read lock-free while the snapshotter runs):
whether it is an eStargz candidate, which converted artefacts exist in its fs dir,
where its blob.meta lives (fusedev cache dir or fscache fs dir), how long its layer's
conversion took and how large its TOC was, and the last error the mount recorded in
ROOT/stargzfs/state.json. Label values are never printed
except the image ref and digests (labels may carry registry credentials).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from stargzfs.cliutil import human_bytes
from stargzfs.conversion import state
from stargzfs.errors import StargzfsError, UsageError
from stargzfs.rafs import chunkmap
from stargzfs.rafs.blobmeta import uncompressed_extent
from stargzfs.snapshots import layout
from stargzfs.snapshots.store import Snapshot, candidate_reason, load_snapshots


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "status", help="list the snapshots of a nydus-snapshotter root and their eStargz conversion state"
    )
    parser.add_argument("root", type=Path, metavar="ROOT", help="snapshotter root (holds metadata.db)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="fusedev blob cache dir (default ROOT/cache)"
    )
    parser.set_defaults(func=run)


def _listing(directory: str) -> set[str] | None:
    """Names in a snapshot's fs dir via one readdir: no per-name lookups that a lazy mount might act on."""
    try:
        return set(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return set()


def snapshot_row(
    root: Path, cache_dir: Path, snapshot: Snapshot, current: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    names = _listing(str(layout.fs_dir(root, snapshot.id)))
    present = names or set()
    layer_hex = snapshot.layer_hex
    blob_meta: list[str] = []
    if layer_hex:
        if os.path.isfile(os.path.join(cache_dir, layout.blob_meta_name(layer_hex))):
            blob_meta.append("fusedev")
        if layout.blob_meta_name(layer_hex) in present:
            blob_meta.append("fscache")
    layer_state = current["layers"].get(layer_hex or "", {})
    image_state = current["images"].get(snapshot.id, {})
    reason = candidate_reason(snapshot)
    return {
        "id": snapshot.id,
        "kind": snapshot.kind,
        "name": snapshot.name,
        "parent_id": snapshot.parent_id,
        "candidate": reason is None,
        "not_candidate_reason": reason,
        "image_ref": snapshot.image_ref,
        "layer_digest": snapshot.layer_digest,
        "toc_digest": snapshot.toc_digest,
        "fs_dir": names is not None,
        "bootstrap": bool(layer_hex) and layout.bootstrap_name(layer_hex or "") in present,
        "image_boot": layout.IMAGE_BOOT in present,
        "blob_meta": blob_meta,
        "layer_status": layer_state.get("status"),
        "layer_error": layer_state.get("error"),
        "convert_seconds": _number(layer_state.get("seconds")),
        "toc_bytes": _number(layer_state.get("toc_bytes")),
        "image_status": image_state.get("status"),
        "image_error": image_state.get("error"),
    }


def blob_rows(cache_dir: Path, current: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Lazy blob caches (`<hex>.chunk_map` beside `<hex>.blob.meta`): chunks cached / total,
    and what the mount fetched for them (state.json)."""
    rows = []
    for name in sorted(_listing(str(cache_dir)) or ()):
        layer_hex = name.removesuffix(".chunk_map")
        if layer_hex == name:
            continue
        try:
            chunks, _ = uncompressed_extent((cache_dir / layout.blob_meta_name(layer_hex)).read_bytes())
            cached = chunkmap.count(chunkmap.decode((cache_dir / name).read_bytes(), chunks), chunks)
        except (OSError, StargzfsError):
            continue  # not a cache of ours (or half gone): nothing to report
        recorded = current.get("blobs", {}).get(layer_hex, {})
        rows.append({
            "layer_hex": layer_hex, "chunks": chunks, "chunks_cached": cached,
            "fetched_bytes": recorded.get("fetched_bytes"), "requests": recorded.get("requests"),
        })
    return rows


def collect(root: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """The status document; raises StargzfsError subclasses for a bad root or database."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory (expected a nydus-snapshotter root)")
    table = load_snapshots(layout.metadata_db(root))
    current = state.load_state(root)
    cache = cache_dir if cache_dir is not None else layout.default_cache_dir(root)
    return {
        "root": str(root),
        "txid": table.txid,
        "snapshots": [snapshot_row(root, cache, snapshot, current) for snapshot in table.all()],
        "blobs": blob_rows(cache, current),
    }


def _number(value: Any) -> float | int | None:
    """state.json is a diagnostic aid another process writes: show only what is a number."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def render_table(document: dict[str, Any]) -> str:
    header = ("ID", "KIND", "PARENT", "CANDIDATE", "BOOTSTRAP", "IMAGE.BOOT", "BLOB.META", "CONVERT", "TOC", "NAME",
              "LAST ERROR")
    rows = [header]
    for row in document["snapshots"]:
        error = row["image_error"] or row["layer_error"]
        rows.append(
            (
                row["id"],
                row["kind"],
                row["parent_id"] or "-",
                "yes" if row["candidate"] else f"no: {row['not_candidate_reason']}",
                _yes(row["bootstrap"]),
                _yes(row["image_boot"]),
                ",".join(row["blob_meta"]) or "-",
                f"{row['convert_seconds']:.2f}s" if row["convert_seconds"] is not None else "-",
                human_bytes(row["toc_bytes"]) if row["toc_bytes"] is not None else "-",
                row["name"],
                error or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)) + "  " + r[-1] for r in rows]
    lines.append(f"{len(document['snapshots'])} snapshots, metadata.db txid {document['txid']}")
    for blob in document.get("blobs", []):
        fetched = blob["fetched_bytes"]
        lines.append(
            f"blob {blob['layer_hex'][:12]}: {blob['chunks_cached']}/{blob['chunks']} chunks cached"
            + (f", {fetched} bytes fetched in {blob['requests']} requests by the last mount" if fetched is not None else "")
        )
    return "\n".join(line.rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    document = collect(args.root, args.cache_dir)
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_table(document))
    return 0

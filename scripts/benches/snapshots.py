"""Reading a large containerd metadata.db lock-free (target: 10k snapshots in <= 0.5 s).

The database is written by containerd's own snapshots/storage (the Go helper in
tests/go/snapdb, one transaction). The peer is the same helper listing it with
bbolt + WalkInfo/GetInfo (includes its process start), run side by side.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.gohelper import Snapdb, build_many_snapshots_db, build_snapdb  # noqa: E402

from _common import median_seconds  # noqa: E402
from stargzfs.snapshots.store import SnapshotSource, load_snapshots  # noqa: E402

TARGET_SECONDS = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshots", type=int, default=10_000, help="committed layers to create")
    parser.add_argument("--repeat", type=int, default=5, help="timed reads (median reported)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="stargzfs-bench-snapshots-") as scratch:
        work = Path(scratch)
        snapdb = Snapdb(build_snapdb(work))
        db = build_many_snapshots_db(snapdb, work / "metadata.db", args.snapshots)
        load_snapshots(db)  # warm the page cache for both readers
        stats: dict[str, int] = {}
        ours = median_seconds(args.repeat, lambda: load_snapshots(db, stats=stats))
        peer = median_seconds(
            args.repeat,
            lambda: subprocess.run([str(snapdb.binary), "list", str(db)], check=True, capture_output=True),
        )
        source = SnapshotSource(db)
        source.current()
        cached = median_seconds(args.repeat, source.current)
        size = db.stat().st_size
    rows = [
        {"reader": "stargzfs load_snapshots", "seconds": f"{ours:.3f}", "vs peer": f"{ours / peer:.2f}x"},
        {"reader": "snapdb list (Go bbolt+storage)", "seconds": f"{peer:.3f}", "vs peer": "1.00x"},
        {
            "reader": "SnapshotSource.current (unchanged)",
            "seconds": f"{cached:.6f}",
            "vs peer": f"{cached / peer:.4f}x",
        },
    ]
    return {
        "rows": rows,
        "snapshots": args.snapshots,
        "db_bytes": size,
        "load_seconds": round(ours, 4),
        "peer_seconds": round(peer, 4),
        "cached_seconds": round(cached, 6),
        "target_seconds": TARGET_SECONDS,
        "meets_target": ours <= TARGET_SECONDS,
        "attempts_last_read": stats.get("attempts"),
    }

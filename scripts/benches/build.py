"""stargzfs-image create on generated TOCs (10k/100k/1M entries) vs mkfs.erofs on the same tree.

Each size gets a TOC with a realistic mix of directories, small files and a few symlinks, and
the same tree made on disk (files empty: mkfs.erofs only lays out metadata then, like create).
Both tools run as subprocesses; wall time and peak RSS come from wait4() of that very child.
Targets (issue #3): 100k ≤ 1.0× mkfs.erofs, RSS ≤ 300 MiB, 1M ≤ 12× the 100k time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
BLOB_ID = "ab" * 32
FILES_PER_DIR = 24
DIR_SHARE = 0.08
SYMLINK_SHARE = 0.02


def _tree(entries: int, seed: int = 7) -> list[dict]:
    """TOC records: a balanced directory tree, small files of varied sizes, some symlinks."""
    rng = random.Random(seed)
    records: list[dict] = [{"name": "./", "type": "dir", "mode": 0o755, "modtime": "2023-01-01T00:00:00Z"}]
    dirs = [""]
    pending_dirs = [""]
    offset = 512
    counter = 0
    while len(records) < entries:
        parent = pending_dirs[0] if pending_dirs else rng.choice(dirs)
        children = 0
        while children < FILES_PER_DIR and len(records) < entries:
            counter += 1
            roll = rng.random()
            prefix = f"{parent}/" if parent else ""
            if roll < DIR_SHARE:
                name = f"{prefix}d{counter}"
                records.append({"name": name + "/", "type": "dir", "mode": 0o755, "modtime": "2023-01-01T00:00:00Z"})
                dirs.append(name)
                pending_dirs.append(name)
            elif roll < DIR_SHARE + SYMLINK_SHARE:
                records.append({"name": f"{prefix}l{counter}", "type": "symlink", "linkName": "../target",
                                "mode": 0o777, "modtime": "2023-01-01T00:00:00Z"})
            else:
                size = int(rng.lognormvariate(7, 2)) % (1 << 20)
                record: dict = {"name": f"{prefix}f{counter}.txt", "type": "reg", "size": size, "mode": 0o644,
                                "modtime": "2023-01-01T00:00:00Z",
                                "digest": "sha256:" + f"{counter:064x}"}
                if size:
                    record["offset"] = offset
                    record["chunkDigest"] = record["digest"]
                    offset += size // 3 + 64
                records.append(record)
            children += 1
        if pending_dirs:
            pending_dirs.pop(0)
    return records


def _write_toc(records: list[dict], path: Path) -> None:
    path.write_text(json.dumps({"version": 1, "entries": records}, separators=(",", ":")))


def _make_disk_tree(records: list[dict], root: Path) -> None:
    root.mkdir()
    for record in records[1:]:
        target = root / record["name"].rstrip("/")
        if record["type"] == "dir":
            target.mkdir()
        elif record["type"] == "symlink":
            target.symlink_to(record["linkName"])
        else:
            target.touch()


def _measure(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process, from its own wait4() rusage."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed with exit {process.returncode}: {stderr.strip()[-500:]}")
    return elapsed, usage.ru_maxrss / 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated entry counts (add 1000000 for the full run)")
    parser.add_argument("--workdir", type=Path, help="keep generated inputs here (default: temp dir, removed)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and size; the best time counts")


def run(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stargzfs-bench-build-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        for size in sizes:
            case = workdir / str(size)
            shutil.rmtree(case, ignore_errors=True)
            case.mkdir()
            records = _tree(size)
            toc = case / "toc.json"
            _write_toc(records, toc)
            _make_disk_tree(records, case / "tree")
            create_argv = [
                str(VENV_BIN / "stargzfs-image"), "create", "--source-type", "stargz_index",
                "--bootstrap", str(case / "boot"), "--blob-id", BLOB_ID, "--repeatable", "--disable-check",
                "--fs-version", "6", "--chunk-size", "0x400000", "--blob-meta", str(case / "meta"), str(toc),
            ]
            mkfs_argv = ["mkfs.erofs", "--quiet", "-T0", "--all-root", str(case / "erofs.img"), str(case / "tree")]
            create = min(_measure(create_argv) for _ in range(args.repeat))
            mkfs = min(_measure(mkfs_argv) for _ in range(args.repeat))
            rows.append({
                "entries": size,
                "create_s": round(create[0], 3),
                "create_rss_mib": round(create[1], 1),
                "mkfs_erofs_s": round(mkfs[0], 3),
                "mkfs_erofs_rss_mib": round(mkfs[1], 1),
                "create/mkfs": round(create[0] / mkfs[0], 2),
                "bootstrap_bytes": (case / "boot").stat().st_size,
            })
            shutil.rmtree(case / "tree")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    by_size = {row["entries"]: row for row in rows}
    result: dict = {"rows": rows}
    if 100_000 in by_size:
        hundred_k = by_size[100_000]
        result["target_100k_vs_mkfs"] = f"{hundred_k['create/mkfs']}x (target <= 1.0x)"
        result["target_rss_100k"] = f"{hundred_k['create_rss_mib']} MiB (target <= 300 MiB)"
        if 1_000_000 in by_size:
            ratio = by_size[1_000_000]["create_s"] / hundred_k["create_s"]
            result["target_1m_vs_100k"] = f"{ratio:.2f}x (target <= 12x)"
    return result

"""FUSE passthrough speed: sequential read and a stat walk through stargzfs vs bindfs.

Both mounts serve the same directory in the same run, each freshly mounted per
measurement (cold FUSE caches, warm source page cache), so the ratio isolates the
FUSE daemon's overhead. Targets: read >= 1.0x bindfs, stat walk >= 0.7x bindfs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.fusemount import is_mounted, start_mount  # noqa: E402

CHUNK = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the sequential-read file")
    parser.add_argument("--files", type=int, default=100_000, help="files in the stat walk")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per tool (best is kept)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/stargzfs-bench-mount"))
    parser.add_argument("--keep", action="store_true", help="keep the generated tree for a re-run")


def _prepare(workdir: Path, size_mib: int, files: int) -> Path:
    fs = workdir / "root" / "snapshots" / "1" / "fs"
    big = fs / "big.bin"
    if not big.exists() or big.stat().st_size != size_mib * CHUNK:
        fs.mkdir(parents=True, exist_ok=True)
        block = os.urandom(CHUNK)
        with open(big, "wb") as handle:
            for _ in range(size_mib):
                handle.write(block)
    tree = fs / "tree"
    marker = fs / f".tree-{files}"
    if not marker.exists():
        shutil.rmtree(tree, ignore_errors=True)
        per_dir = 1000
        for index in range(files):
            directory = tree / f"d{index // per_dir:04d}"
            if index % per_dir == 0:
                directory.mkdir(parents=True)
            (directory / f"f{index % per_dir:04d}").touch()
        marker.touch()
    return fs


def _read_all(path: Path) -> int:
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.read(fd, CHUNK):
            total += len(chunk)
    finally:
        os.close(fd)
    return total


def _stat_walk(top: Path) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return count


def _unmount(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)


def _with_stargzfs(workdir: Path, fs: Path, action: Callable[[Path], int]) -> tuple[float, int]:
    mountpoint = workdir / "mnt-stargzfs"
    running = start_mount(
        {"root": str(workdir / "root"), "mountpoint": str(mountpoint), "tops": {"1": str(fs)}},
        workdir / "stargzfs.log",
    )
    try:
        started = time.perf_counter()
        result = action(mountpoint / "1")
        return time.perf_counter() - started, result
    finally:
        running.stop()


def _with_bindfs(workdir: Path, fs: Path, action: Callable[[Path], int]) -> tuple[float, int]:
    mountpoint = workdir / "mnt-bindfs"
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(["bindfs", "-o", "ro", str(fs), str(mountpoint)], check=True)
    try:
        started = time.perf_counter()
        result = action(mountpoint)
        return time.perf_counter() - started, result
    finally:
        _unmount(mountpoint)


def run(args: argparse.Namespace) -> dict:
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    fs = _prepare(workdir, args.size_mib, args.files)
    _read_all(fs / "big.bin")  # source in the page cache: measure FUSE, not the disk
    _stat_walk(fs / "tree")
    measurements = {
        "sequential read": (lambda top: _read_all(top / "big.bin"), args.size_mib * CHUNK),
        "stat walk": (lambda top: _stat_walk(top / "tree"), None),
    }
    rows, summary = [], {}
    for name, (action, expected) in measurements.items():
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for tool, runner in (("stargzfs", _with_stargzfs), ("bindfs", _with_bindfs)):
                seconds, result = runner(workdir, fs, action)
                if expected is not None and result != expected:
                    raise RuntimeError(f"{tool} {name}: got {result} bytes, expected {expected}")
                best[tool] = min(best.get(tool, seconds), seconds)
        ratio = best["bindfs"] / best["stargzfs"]  # >1: stargzfs is faster
        unit_count = args.size_mib if expected is not None else args.files
        unit = "MiB/s" if expected is not None else "stats/s"
        rows.append({
            "measurement": name,
            f"stargzfs": f"{unit_count / best['stargzfs']:.0f} {unit}",
            "bindfs": f"{unit_count / best['bindfs']:.0f} {unit}",
            "ratio (stargzfs/bindfs throughput)": f"{ratio:.2f}x",
        })
        summary[name] = {"stargzfs_s": round(best["stargzfs"], 3), "bindfs_s": round(best["bindfs"], 3),
                         "ratio": round(ratio, 3)}
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"rows": rows, "size_mib": args.size_mib, "files": args.files, "rounds": args.rounds, **summary}

"""FUSE passthrough speed (sequential read, stat walk vs bindfs) and first-lookup latency.

Both mounts serve the same directory in the same run, each freshly mounted per
measurement (cold FUSE caches, warm source page cache), so the ratio isolates the
FUSE daemon's overhead. Targets: read >= 1.0x bindfs, stat walk >= 0.7x bindfs.

First lookup (`--lookup-layers N`, 0 skips it): a real N-layer eStargz image (ctr-remote,
loopback docker-registry) in a real metadata.db; per layer the time of the first `stat` of
MNT/<id>/<hex> through `stargzfs mount` and the registry requests it caused (access log),
against the bare fetch+build of the same layer in the same run (fetch_toc + one
`stargzfs-image create` with the seed's argv). Targets: <= 1.2x the bare time, <= 2 requests.
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
    parser.add_argument("--lookup-layers", type=int, default=4, help="layers in the first-lookup part (0: skip)")
    parser.add_argument("--lookup-files", type=int, default=2000, help="files per layer in the first-lookup image")
    parser.add_argument("--skip-passthrough", action="store_true", help="only run the first-lookup part")


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


def _first_lookup(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Per layer: first stat through the mount vs bare fetch_toc + stargzfs-image create."""
    import tempfile

    import trio

    from stargzfs.estargz.fetch import fetch_toc
    from stargzfs.registry import RegistryClient
    from support.gohelper import Snapdb, build_snapdb
    from support.images import Containerd, FileSpec, build_image
    from support.registry import RegistryProcess

    work = Path(tempfile.mkdtemp(prefix="stargzfs-bench-lookup-"))
    registry = RegistryProcess(work / "registry")
    registry.start()
    mountpoint = work / "mnt"
    try:
        containerd = Containerd(work / "containerd")
        containerd.start()
        try:
            layers = [
                [FileSpec(f"l{layer}/d{i // 100:03d}/f{i:05d}", data=f"{layer}:{i}\n".encode() * (1 + i % 7))
                 for i in range(args.lookup_files)]
                for layer in range(args.lookup_layers)
            ]
            image = build_image(containerd, registry, "bench/lookup:esgz", layers, compression="gzip")
        finally:
            containerd.stop()
        root = work / "root"
        root.mkdir()
        ops, parent = [], ""
        for index, layer in enumerate(image.layers):
            name = f"sha256:bench-{index}"
            key = f"k8s.io/{index}/extract {name}"
            ops.append({"op": "active", "key": key, "parent": parent, "labels": {}})
            ops.append({"op": "commit", "key": key, "name": name, "labels": {
                "containerd.io/snapshot/cri.image-ref": image.ref,
                "containerd.io/snapshot/cri.layer-digest": layer.digest}})
            parent = name
        snapdb = Snapdb(build_snapdb(work / "snapdb"))
        snapdb.apply(root / "metadata.db", [ops])
        ids = {row["name"]: row["id"] for row in snapdb.list(root / "metadata.db")}
        for snapshot_id in ids.values():
            (root / "snapshots" / snapshot_id / "fs").mkdir(parents=True)

        async def bare(digest: str, out: Path) -> float:
            started = time.perf_counter()
            async with RegistryClient() as client:
                result = await fetch_toc(client.blob(image.ref, digest), parse=False)  # as the mount does
            toc = out / "stargz.index.json"
            toc.write_bytes(result.raw)
            layer_hex = digest.split(":")[1]
            await trio.run_process([
                str(REPO / ".venv" / "bin" / "stargzfs-image"), "create", "--source-type", "stargz_index",
                "--bootstrap", str(out / layer_hex), "--blob-id", layer_hex, "--repeatable", "--disable-check",
                "--fs-version", "6", "--chunk-size", "0x400000", "--blob-meta", str(out / f"{layer_hex}.blob.meta"),
                str(toc)])
            return time.perf_counter() - started

        bare_times = {}
        for layer in image.layers:  # warm the registry's page cache for both sides alike
            registry.blob_path(layer.digest).read_bytes()
        for index, layer in enumerate(image.layers):
            out = work / f"bare-{index}"
            out.mkdir()
            bare_times[layer.digest] = trio.run(bare, layer.digest, out)
        mountpoint.mkdir()
        subprocess.run([str(REPO / ".venv" / "bin" / "stargzfs"), "mount", str(root), str(mountpoint),
                        "--log-file", str(work / "daemon.log")], check=True, capture_output=True)
        rows, ratios, requests = [], [], []
        for index, layer in enumerate(image.layers):
            mark = registry.mark()
            started = time.perf_counter()
            os.stat(mountpoint / ids[f"sha256:bench-{index}"] / layer.digest.split(":")[1])
            seconds = time.perf_counter() - started
            count = len(registry.requests_for(layer.digest, since=mark))
            ratio = seconds / bare_times[layer.digest]
            ratios.append(ratio)
            requests.append(count)
            rows.append({"measurement": f"first lookup, layer {index}",
                         "stargzfs": f"{seconds * 1000:.0f} ms, {count} request(s)",
                         "bindfs": f"bare fetch+build {bare_times[layer.digest] * 1000:.0f} ms",
                         "ratio (stargzfs/bindfs throughput)": f"{ratio:.2f}x of bare"})
        summary = {"first lookup": {"max_ratio_vs_bare": round(max(ratios), 3),
                                    "max_requests_per_layer": max(requests), "layers": len(ratios),
                                    "files_per_layer": args.lookup_files}}
        return rows, summary
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace) -> dict:
    lookup_rows, lookup_summary = _first_lookup(args) if args.lookup_layers > 0 else ([], {})
    if args.skip_passthrough:
        return {"rows": lookup_rows, **lookup_summary}
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
            "stargzfs": f"{unit_count / best['stargzfs']:.0f} {unit}",
            "bindfs": f"{unit_count / best['bindfs']:.0f} {unit}",
            "ratio (stargzfs/bindfs throughput)": f"{ratio:.2f}x",
        })
        summary[name] = {"stargzfs_s": round(best["stargzfs"], 3), "bindfs_s": round(best["bindfs"], 3),
                         "ratio": round(ratio, 3)}
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"rows": lookup_rows + rows, "size_mib": args.size_mib, "files": args.files, "rounds": args.rounds,
            **lookup_summary, **summary}

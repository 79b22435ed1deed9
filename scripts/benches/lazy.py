"""Lazy image serving vs stargz-snapshotter's FUSE fs: first byte, cold/warm reads, stats, RSS.

One real eStargz image (ctr-remote, gzip; default 1,000 files, ~40 MiB of file data, a tenth of the
files 12 directories deep) in a fresh loopback docker-registry is served by each contender, and the
same measurement code runs over each contender's merged view of it:

  first byte   nothing -> the first byte of a file deep in the tree (daemon start + mounts + read),
               with the bytes the registry served for it (laziness: << the blob size)
  idle         bytes served after that, idle for --idle-seconds (background fetch, if any)
  cold read    every file, freshly started with an empty cache dir: MiB/s, registry bytes, peak RSS
  warm read    every file again after unmount + mount in the same daemon (local caches kept)
  restart read every file again after a daemon restart on the same cache dir
  stat walk    lstat every file after a remount: files/s

Registry bytes come from the registry's own access log (response body bytes). Contenders:
"peer" = stargz-snapshotter 0.12's fs (scripts/benches/stargz_peer, one FUSE mount per layer plus
overlayfs, as the snapshotter shows an image to a container); "stargzfs" = ours, a hook not yet
implemented (see StargzfsContender). With both, the ratios stargzfs/peer are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(BENCHES))

from _stargz_peer import PeerImageMount, StargzPeer, ensure_apt_packages, peer_binary  # noqa: E402
from support.images import Containerd, FileSpec, PushedImage, build_image  # noqa: E402
from support.gohelper import Snapdb, build_snapdb  # noqa: E402
from support.registry import RegistryProcess  # noqa: E402
from support.snapshot_root import STARGZFS, ChainLayer, Daemon, SnapshotRoot, start_daemon, write_root  # noqa: E402

CHUNK = 1 << 20
MIB = 1 << 20
DEEP_DIR = "/".join(f"l{level:02d}" for level in range(1, 12))  # deep/<n>/l01/.../l11: 13 levels
SEED = 20261204


# --------------------------------------------------------------------------------------------------
# The image


@dataclass(frozen=True)
class BenchImage:
    """The pushed image plus what every contender must serve: file list, content digest, target."""

    pushed: PushedImage
    registry: RegistryProcess
    files: list[tuple[str, int]]  # (path relative to the image root, size), sorted: the read order
    content_sha256: str  # sha256 over all files' bytes in `files` order
    deep_file: str  # the first-byte target

    @property
    def digests(self) -> set[str]:
        return {layer.digest for layer in self.pushed.layers}

    @property
    def blob_bytes(self) -> int:
        return sum(layer.size for layer in self.pushed.layers)

    @property
    def file_bytes(self) -> int:
        return sum(size for _, size in self.files)


def _sizes(rng: random.Random, files: int, total: int) -> list[int]:
    """1% big files holding half the bytes; the rest log-uniform 1 KiB..128 KiB sharing the other half."""
    big = max(1, files // 100)
    small = [math.exp(rng.uniform(math.log(1024), math.log(128 * 1024))) for _ in range(files - big)]
    scale = (total - total // 2) / sum(small) if small else 0.0
    return [total // 2 // big] * big + [max(1, int(size * scale)) for size in small]


def _content(rng: random.Random, path: str, size: int) -> bytes:
    """Half random bytes, half repeated text: gzip gets a realistic ~2:1 overall, not 1:1 or 100:1."""
    noise = rng.randbytes(size // 2)
    text = (f"{path} line of text\n".encode() * (size // 20 + 1))[: size - len(noise)]
    return noise + text


def _layer_specs(files: dict[str, bytes], layers: int) -> list[list[FileSpec]]:
    """File i goes to layer i % layers; each layer lists its parent dirs first, then its files."""
    per_layer: list[list[str]] = [[] for _ in range(layers)]
    for index, path in enumerate(sorted(files)):
        per_layer[index % layers].append(path)
    specs = []
    for paths in per_layer:
        dirs = sorted({"/".join(path.split("/")[:depth]) for path in paths for depth in range(1, path.count("/") + 1)})
        specs.append([FileSpec(d, kind="dir") for d in dirs] + [FileSpec(p, data=files[p]) for p in paths])
    return specs


def build_bench_image(work: Path, registry: RegistryProcess, files: int, total_mib: float, layers: int,
                      deep_share: float) -> BenchImage:
    """Generate the tree (deterministic), build it with ctr-remote and push it to `registry`."""
    rng = random.Random(SEED)
    contents: dict[str, bytes] = {}
    deep_every = max(1, round(1 / deep_share)) if deep_share > 0 else 0
    for index, size in enumerate(_sizes(rng, files, int(total_mib * MIB))):
        if index < max(1, files // 100):
            path = f"opt/big/blob{index:03d}.bin"
        elif deep_every and index % deep_every == 0:
            path = f"deep/{index % 3}/{DEEP_DIR}/f{index:05d}.dat"
        else:
            path = f"usr/lib/d{index % 40:02d}/f{index:05d}.dat"
        contents[path] = _content(rng, path, size)
    deep = sorted(path for path in contents if path.startswith("deep/")) or sorted(contents)
    containerd = Containerd(work / "containerd")
    containerd.start()
    try:
        pushed = build_image(containerd, registry, "bench/lazy:esgz", _layer_specs(contents, layers),
                             compression="gzip")
    finally:
        containerd.stop()
    digest = hashlib.sha256()
    for path in sorted(contents):
        digest.update(contents[path])
    return BenchImage(pushed, registry, [(path, len(contents[path])) for path in sorted(contents)],
                      digest.hexdigest(), deep[-1])


def served(image: BenchImage, since: int) -> tuple[int, int]:
    """(requests, response body bytes) for the image's blobs in the registry's access log since `since`."""
    records = [record for record in image.registry.access_log()[since:]
               if record.path.rpartition("/blobs/")[2] in image.digests]
    return len(records), sum(record.bytes for record in records)


# --------------------------------------------------------------------------------------------------
# Contenders


class Contender(ABC):
    """A lazy filesystem that serves an image's merged tree at `view`.

    Subclasses implement the life cycle; the measurements (first_byte, read_all, stat_all) are shared
    so every contender is measured by the very same code.
    """

    name: str

    @abstractmethod
    def launch(self, image: BenchImage, state: Path) -> None:
        """Start the daemon (not timed: a node runs it before any image is wanted); `state` holds caches."""

    @abstractmethod
    def mount_image(self) -> None:
        """From a running daemon to the image mounted at `view` (timed as part of the first byte)."""

    def start(self, image: BenchImage, state: Path) -> None:
        self.launch(image, state)
        self.mount_image()

    @property
    @abstractmethod
    def view(self) -> Path:
        """The image's merged root directory while started."""

    @abstractmethod
    def remount(self) -> None:
        """Unmount and mount again in the same daemon, keeping its local caches."""

    @abstractmethod
    def restart(self) -> None:
        """Stop the daemon and start a new one on the same `state` dir (on-disk cache kept)."""

    @abstractmethod
    def stop(self) -> None:
        """Unmount everything and end the daemon; safe to call twice."""

    @abstractmethod
    def pids(self) -> list[int]:
        """The processes whose memory counts as the contender's (for peak RSS)."""

    def first_byte(self, path: str) -> bytes:
        with open(self.view / path, "rb") as handle:
            return handle.read(1)

    def read_all(self, files: list[tuple[str, int]]) -> tuple[int, str]:
        """Read every file in order; (bytes, sha256 over all of them) to prove the content right."""
        digest = hashlib.sha256()
        total = 0
        for path, _ in files:
            fd = os.open(self.view / path, os.O_RDONLY)
            try:
                while chunk := os.read(fd, CHUNK):
                    digest.update(chunk)
                    total += len(chunk)
            finally:
                os.close(fd)
        return total, digest.hexdigest()

    def stat_all(self, files: list[tuple[str, int]]) -> int:
        for path, size in files:
            if os.lstat(self.view / path).st_size != size:
                raise RuntimeError(f"{self.name}: {path} has the wrong size")
        return len(files)


class PeerContender(Contender):
    """stargz-snapshotter's filesystem: one stargz-peer process, one FUSE mount per layer."""

    name = "peer"

    def __init__(self, work: Path, config: dict) -> None:
        self.work = work
        self.config = config
        self._peer: StargzPeer | None = None
        self._mount: PeerImageMount | None = None
        self._image: BenchImage | None = None
        self._state: Path | None = None

    def launch(self, image: BenchImage, state: Path) -> None:
        self._image, self._state = image, state
        self._peer = StargzPeer(state, self.work / "peer.log", self.config)
        self._peer.start()
        self._mount = PeerImageMount(self._peer, image.pushed, self.work / "mnt-peer")

    def mount_image(self) -> None:
        assert self._mount is not None
        self._mount.mount()

    @property
    def view(self) -> Path:
        assert self._mount is not None
        return self._mount.view

    def remount(self) -> None:
        assert self._mount is not None
        self._mount.unmount()
        self._mount.mount()

    def restart(self) -> None:
        assert self._image is not None and self._state is not None
        image, state = self._image, self._state
        self.stop()
        self.start(image, state)

    def stop(self) -> None:
        mount, self._mount = self._mount, None
        peer, self._peer = self._peer, None
        try:
            if mount is not None:
                mount.unmount()
        finally:
            if peer is not None:
                peer.stop()

    def pids(self) -> list[int]:
        pid = self._peer.pid if self._peer is not None else None
        return [pid] if pid is not None else []


class StargzfsContender(Contender):
    """Ours: a snapshotter root for the image, `stargzfs mount` over it, and `stargzfs mount-image`:
    the layer blobs as lazily fetched files, the kernel's erofs over the merged bootstrap.

    `launch` (untimed, like the peer's process start) writes metadata.db with containerd's own
    storage code and starts the daemon; `mount_image` (timed) converts and merges the chain
    (image.boot), then mounts it.
    """

    name = "stargzfs"

    def __init__(self, work: Path, extra: Sequence[str] = ()) -> None:
        self.work = work
        self.extra = list(extra)
        self._daemon: Daemon | None = None
        self._root: SnapshotRoot | None = None
        self._view = work / "mnt-stargzfs-image"
        self._logs = 0

    def launch(self, image: BenchImage, state: Path) -> None:
        state.mkdir(parents=True, exist_ok=True)
        root = state / "root"
        if not (root / "metadata.db").exists():
            chain = [ChainLayer(image.pushed.ref, layer.digest, layer.toc_digest) for layer in image.pushed.layers]
            self._root = SnapshotRoot(root, write_root(Snapdb(build_snapdb(self.work)), root, {"bench": chain}))
        else:
            self._root = SnapshotRoot(root, {})
        self._start_daemon()

    def _start_daemon(self) -> None:
        assert self._root is not None
        self._logs += 1
        mountpoint = self.work / "mnt-stargzfs"
        self._daemon = start_daemon(self._root.root, mountpoint, self.work / f"stargzfs{self._logs}.log",
                                    "--log-level", "info", *self.extra)

    def mount_image(self) -> None:
        assert self._daemon is not None and self._root is not None
        self._view.mkdir(parents=True, exist_ok=True)
        top = max(os.listdir(self._root.root / "snapshots"), key=int)
        done = subprocess.run([STARGZFS, "mount-image", str(self._daemon.mountpoint), top, str(self._view)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"stargzfs mount-image failed: {done.stderr.strip()}")

    @property
    def view(self) -> Path:
        return self._view

    def _umount_image(self) -> None:
        if self._view.is_mount():
            subprocess.run([STARGZFS, "umount", str(self._view)], check=True, capture_output=True)

    def remount(self) -> None:
        self._umount_image()
        self.mount_image()

    def restart(self) -> None:
        self._umount_image()
        if self._daemon is not None:
            self._daemon.stop()
        self._start_daemon()
        self.mount_image()

    def stop(self) -> None:
        try:
            self._umount_image()
        finally:
            daemon, self._daemon = self._daemon, None
            if daemon is not None:
                daemon.stop()

    def pids(self) -> list[int]:
        return [self._daemon.pid] if self._daemon is not None else []


def drop_caches() -> None:
    """The kernel's page cache out of the picture: a remount must read from the contender."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --------------------------------------------------------------------------------------------------
# Measurements


def _reset_peak_rss(pids: list[int]) -> None:
    """Writing 5 to clear_refs resets VmHWM, so the next peak covers only what follows."""
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def _peak_rss_mib(pids: list[int]) -> float:
    total_kib = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def _timed_read(contender: Contender, image: BenchImage) -> dict[str, float]:
    """Read every file; seconds, MiB/s and the registry requests/bytes it caused."""
    mark = image.registry.mark()
    started = time.perf_counter()
    total, digest = contender.read_all(image.files)
    seconds = time.perf_counter() - started
    if total != image.file_bytes or digest != image.content_sha256:
        raise RuntimeError(f"{contender.name}: read {total} bytes with sha256 {digest}, expected "
                           f"{image.file_bytes} / {image.content_sha256}")
    requests, fetched = served(image, mark)
    return {"s": seconds, "mib_s": total / MIB / seconds, "requests": requests, "bytes": fetched}


@contextlib.contextmanager
def _launched(contender: Contender, image: BenchImage, state: Path, *, mount: bool) -> Iterator[Contender]:
    """launch() [+ mount_image()] .. stop(), stop() also after a half-way failure (no stray mounts)."""
    try:
        contender.launch(image, state)
        if mount:
            contender.mount_image()
        yield contender
    finally:
        contender.stop()


def measure(contender: Contender, image: BenchImage, work: Path, idle_seconds: float) -> dict[str, float]:
    """The whole sequence for one contender, each part from the state the module docstring names."""
    result: dict[str, float] = {}
    with _launched(contender, image, work / f"{contender.name}-state-first", mount=False):
        mark = image.registry.mark()
        started = time.perf_counter()
        contender.mount_image()
        mounted = time.perf_counter()
        if len(contender.first_byte(image.deep_file)) != 1:
            raise RuntimeError(f"{contender.name}: {image.deep_file} read no byte")
        done = time.perf_counter()
        result.update({"first_byte_s": done - started, "first_byte_mount_s": mounted - started,
                       "first_byte_read_s": done - mounted})
        result["first_byte_requests"], result["first_byte_bytes"] = served(image, mark)
        if idle_seconds > 0:
            time.sleep(idle_seconds)
            result["idle_requests"], result["idle_bytes"] = served(image, mark)

    with _launched(contender, image, work / f"{contender.name}-state", mount=True):
        _reset_peak_rss(contender.pids())
        cold = _timed_read(contender, image)
        result["cold_peak_rss_mib"] = _peak_rss_mib(contender.pids())
        result.update({f"cold_{key}": value for key, value in cold.items()})
        contender.remount()
        drop_caches()  # what the contender caches on disk, not what the kernel kept in memory
        result.update({f"warm_{key}": value for key, value in _timed_read(contender, image).items()})
        contender.remount()
        drop_caches()
        started = time.perf_counter()
        count = contender.stat_all(image.files)
        result["stat_files_s"] = count / (time.perf_counter() - started)
        contender.restart()
        drop_caches()
        result.update({f"restart_{key}": value for key, value in _timed_read(contender, image).items()})
    return result


# (metric, label, unit, True when higher is better); ratios are stargzfs / peer.
METRICS = [
    ("first_byte_s", "nothing -> first byte", "s", False),
    ("first_byte_bytes", "  registry bytes for it", "B", False),
    ("idle_bytes", "  + bytes after idling", "B", False),
    ("cold_s", "cold read, all files", "s", False),
    ("cold_mib_s", "  throughput", "MiB/s", True),
    ("cold_bytes", "  registry bytes", "B", False),
    ("cold_peak_rss_mib", "  peak RSS", "MiB", False),
    ("warm_mib_s", "warm read after remount", "MiB/s", True),
    ("warm_bytes", "  registry bytes", "B", False),
    ("restart_mib_s", "read after daemon restart", "MiB/s", True),
    ("restart_bytes", "  registry bytes", "B", False),
    ("stat_files_s", "stat every file", "files/s", True),
]


def ratios(results: dict[str, dict[str, float]], ours: str = "stargzfs", peer: str = "peer") -> dict[str, float]:
    """ours / peer per metric both have (> 1 is better for ours where higher is better, worse otherwise)."""
    if ours not in results or peer not in results:
        return {}
    return {metric: results[ours][metric] / results[peer][metric]
            for metric, *_ in METRICS
            if metric in results[ours] and results[peer].get(metric)}


def _format(value: float, unit: str) -> str:
    if unit == "B":
        return f"{value / MIB:.2f} MiB ({int(value):,} B)"
    return f"{value:,.3f} {unit}" if unit == "s" else f"{value:,.1f} {unit}"


# --------------------------------------------------------------------------------------------------
# Entry points


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--files", type=int, default=1000, help="files in the image")
    parser.add_argument("--total-mib", type=float, default=40.0, help="total file bytes in the image")
    parser.add_argument("--layers", type=int, default=1, help="layers (files spread round-robin)")
    parser.add_argument("--deep-share", type=float, default=0.1, help="share of files 13 directories deep")
    parser.add_argument("--contenders", default="peer,stargzfs", help="comma list of peer,stargzfs")
    parser.add_argument("--stargzfs-args", default="", help="extra `stargzfs mount` arguments, e.g. '--log-level debug'")
    parser.add_argument("--peer-config", default="{}",
                        help='stargz-snapshotter fs config as JSON, Go field names, e.g. {"NoBackgroundFetch":true}')
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="idle after the first byte to see background fetching (0: skip)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sequence; medians are reported")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state dirs)")


def run(args: argparse.Namespace) -> dict:
    names = [name.strip() for name in args.contenders.split(",") if name.strip()]
    if not names or set(names) - {"peer", "stargzfs"}:
        raise SystemExit(f"--contenders: expected peer and/or stargzfs, got {args.contenders!r}")
    if "peer" in names:
        ensure_apt_packages()
        peer_binary()  # build before anything is timed
    work = Path(tempfile.mkdtemp(prefix="stargzfs-bench-lazy-"))
    registry = RegistryProcess(work / "registry")
    registry.start()
    try:
        image = build_bench_image(work, registry, args.files, args.total_mib, args.layers, args.deep_share)
        for digest in image.digests:  # the registry's disk out of the picture for every contender alike
            registry.blob_path(digest).read_bytes()
        contenders: dict[str, Contender] = {
            name: PeerContender(work, json.loads(args.peer_config)) if name == "peer"
            else StargzfsContender(work, args.stargzfs_args.split())
            for name in names
        }
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            for name, contender in contenders.items():  # alternate, so drift hits both sides
                runs[name].append(measure(contender, image, work / f"round{round_index}", args.idle_seconds))
        results = {name: {metric: statistics.median(run[metric] for run in rounds) for metric in rounds[0]}
                   for name, rounds in runs.items()}
    finally:
        registry.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = ratios(results)
    rows = []
    for metric, label, unit, higher_better in METRICS:
        if not any(metric in result for result in results.values()):
            continue
        row = {"measurement": label}
        for name in names:
            row[name] = _format(results[name][metric], unit) if metric in results[name] else "-"
        if ratio:
            better = "higher" if higher_better else "lower"
            row["stargzfs/peer"] = f"{ratio[metric]:.2f}x ({better} is better)" if metric in ratio else "-"
        rows.append(row)
    return {
        "rows": rows,
        "image": {"ref": image.pushed.ref, "layers": len(image.pushed.layers), "files": len(image.files),
                  "file_bytes": image.file_bytes, "blob_bytes": image.blob_bytes,
                  "deep_file": image.deep_file, "deep_file_bytes": dict(image.files)[image.deep_file]},
        "results": results,
        "ratios": ratio,
        "lazy": {name: result["first_byte_bytes"] / image.blob_bytes for name, result in results.items()},
        "rounds": args.rounds,
        "work": str(work) if args.keep else None,
    }

"""Lazy image serving: MNT/.blobs/<hex> fetched on demand, and `stargzfs mount-image` on top.

Real parts: ctr-remote eStargz (gzip and zstd) in a loopback docker-registry, metadata.db
from containerd's storage code, `stargzfs mount` daemons, the kernel's erofs mounting the
merged bootstrap over the lazy blob files, and kernel overlayfs over GNU tar extractions of
the same layers as the oracle for what the image must show.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stargzfs.rafs import chunkmap
from stargzfs.rafs.blobmeta import decode_blob_meta
from stargzfs.snapshots import layout
from support.erofs import overlay_mounted, tree_snapshot
from support.images import FileSpec, PushedImage, build_image
from support.registry import RegistryProcess
from support.snapshot_root import (
    STARGZFS,
    ChainLayer,
    Daemon,
    SnapshotRoot,
    hex_of,
    image_chain,
    image_cli_ok,
    write_root,
)
from support.stacks import stacked_image, stacked_overlay_lowers


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STARGZFS, *map(str, args)], capture_output=True, text=True, timeout=120)


@dataclass
class Mounted:
    daemon: Daemon
    target: Path

    def unmount(self) -> None:
        if self.target.is_mount():
            assert cli("umount", self.target).returncode == 0
        self.daemon.stop()


@pytest.fixture
def mount_image(daemons, tmp_path: Path) -> Iterator[Callable[..., Mounted]]:  # type: ignore[no-untyped-def]
    made: list[Mounted] = []

    def make(root: SnapshotRoot, snapshot_id: str, *extra: str, daemon: Daemon | None = None) -> Mounted:
        daemon = daemon or daemons(root.root, *extra)
        target = tmp_path / f"image{len(made)}"
        target.mkdir()
        done = cli("mount-image", daemon.mountpoint, snapshot_id, target)
        assert done.returncode == 0, done.stderr
        mounted = Mounted(daemon, target)
        made.append(mounted)
        return mounted

    yield make
    for mounted in made:
        if mounted.target.is_mount():
            subprocess.run(["umount", "-l", str(mounted.target)], capture_output=True)


def read_everything(root: Path) -> dict[str, bytes]:
    """sha256 of every regular file under `root`, read through the page cache."""
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).digest()
    return out


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def blob_bytes_served(registry: RegistryProcess, image: PushedImage, since: int) -> tuple[int, int]:
    """(data requests, bytes) the registry served for the image's layer blobs since `since`."""
    requests = [r for layer in image.layers for r in registry.requests_for(layer.digest, since=since)]
    return len(requests), sum(r.bytes for r in requests)


@pytest.fixture(scope="module")
def stacked(containerd, registry, image_cache) -> dict[str, PushedImage]:  # type: ignore[no-untyped-def]
    return {c: stacked_image(image_cache, containerd, registry, c) for c in ("gzip", "zstd")}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The stacked image as kernel overlayfs shows GNU tar extractions of its layers."""
    with overlay_mounted(stacked_overlay_lowers(tmp_path_factory.mktemp("overlay-oracle"))) as view:
        expected = tree_snapshot(view, uid_gid=False)
    expected.pop("/")
    return expected


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_mount_image_shows_what_overlayfs_shows_and_fetches_each_chunk_once(
    stacked, oracle, compression: str, snapdb, mount_image, registry: RegistryProcess, tmp_path: Path
) -> None:
    image = stacked[compression]
    chain = image_chain(image)
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root", {"s": chain}))
    top = root.sid("s", len(chain) - 1)
    mark = registry.mark()
    mounted = mount_image(root, top, "--no-prefetch")
    actual = tree_snapshot(mounted.target, uid_gid=False)
    actual.pop("/")
    assert actual == oracle
    contents = read_everything(mounted.target)
    first_requests, first_bytes = blob_bytes_served(registry, image, mark)
    cache = root.root / "cache"
    for layer in image.layers:
        digest_hex = hex_of(layer.digest)
        meta = cache / layout.blob_meta_name(digest_hex)
        if not meta.exists():
            continue  # a layer of only dirs and whiteouts has no blob
        # the lazy file's bytes are exactly what materialize writes (this also reads the chunks
        # of files an upper layer hides, which reading the image never needs)
        device = tmp_path / f"{digest_hex}.dev"
        image_cli_ok("materialize", "--blob-meta", meta, "--blob", f"{image.ref}@{layer.digest}", "-o", device)
        assert (mounted.daemon.mountpoint / ".blobs" / digest_hex).read_bytes() == device.read_bytes()
        _, entries = decode_blob_meta(meta.read_bytes())
        bitmap = chunkmap.decode((cache / layout.chunk_map_name(digest_hex)).read_bytes(), len(entries))
        assert chunkmap.count(bitmap, len(entries)) == len(entries)
        assert (cache / layout.chunk_map_name(digest_hex)).read_bytes()[:16] == chunkmap.all_ready_header()
    assert first_bytes <= 1.1 * sum(len(layer.blob()) for layer in image.layers)
    mark = registry.mark()
    drop_caches()
    assert read_everything(mounted.target) == contents
    assert blob_bytes_served(registry, image, mark)[1] == 0  # every chunk was fetched once
    # after a remount, the cache serves everything: no request at all
    mounted.unmount()
    mark = registry.mark()
    again = mount_image(root, top, "--no-prefetch")
    assert read_everything(again.target) == contents
    assert blob_bytes_served(registry, image, mark)[1] == 0  # (materialize's reads are not ours)
    log = again.daemon.log_text()
    assert "Traceback" not in log and first_requests >= 1


def test_parallel_readers_share_one_fetch_per_chunk(stacked, snapdb, daemons, registry: RegistryProcess,
                                                   tmp_path: Path) -> None:
    image = stacked["gzip"]
    chain = image_chain(image)[:1]
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root", {"s": chain}))
    daemon = daemons(root.root, "--no-prefetch")
    digest_hex = hex_of(chain[0].digest)
    os.stat(daemon.mountpoint / root.sid("s") / digest_hex)  # converts the layer
    blob = daemon.mountpoint / ".blobs" / digest_hex
    mark = registry.mark()
    barrier = threading.Barrier(16)
    results: list[bytes | BaseException] = []

    def read() -> None:
        barrier.wait()
        try:
            results.append(blob.read_bytes())
        except OSError as exc:
            results.append(exc)

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 16 and all(isinstance(r, bytes) and r == results[0] for r in results)
    fetched = registry.requests_for(chain[0].digest, since=mark)
    assert sum(r.bytes for r in fetched) <= 1.1 * len(image.layers[0].blob())
    assert "fetched [" in daemon.log_text()


def test_a_failed_fetch_is_eio_and_retried_later_never_unverified_bytes(
    registry_factory, registry: RegistryProcess, snapdb, daemons, stacked, tmp_path: Path
) -> None:
    image = stacked["gzip"]
    private = registry_factory(seed_from=registry)
    layer = image.layers[0]
    chain = [ChainLayer(f"{private.host}/{image.repository}:{image.tag}", layer.digest, layer.toc_digest)]
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root", {"s": chain}))
    daemon = daemons(root.root, "--no-prefetch", "--registry-timeout", "1", "--registry-retries", "0")
    digest_hex = hex_of(layer.digest)
    os.stat(daemon.mountpoint / root.sid("s") / digest_hex)
    blob = daemon.mountpoint / ".blobs" / digest_hex
    original = private.blob_path(layer.digest).read_bytes()
    # the registry now serves other bytes for the digest: every chunk fails its TOC digest
    tampered = bytearray(original)
    for offset in range(0, len(tampered) - 64, 97):
        tampered[offset] ^= 0x5A
    private.blob_path(layer.digest).write_bytes(bytes(tampered))
    with pytest.raises(OSError) as refused:
        blob.read_bytes()
    assert refused.value.errno == errno.EIO
    cache = root.root / "cache"
    _, entries = decode_blob_meta((cache / layout.blob_meta_name(digest_hex)).read_bytes())
    bitmap = chunkmap.decode((cache / layout.chunk_map_name(digest_hex)).read_bytes(), len(entries))
    assert chunkmap.count(bitmap, len(entries)) == 0  # nothing unverified was kept
    # the registry goes away: EIO again (no hang), then it comes back honest: the read works
    private.stop()
    with pytest.raises(OSError) as down:
        blob.read_bytes()
    assert down.value.errno == errno.EIO
    private.blob_path(layer.digest).write_bytes(original)
    private.start()
    assert hashlib.sha256(blob.read_bytes()).digest()  # retried, verified, served
    assert chunkmap.count(chunkmap.decode((cache / layout.chunk_map_name(digest_hex)).read_bytes(),
                                          len(entries)), len(entries)) == len(entries)


@pytest.fixture(scope="module")
def prioritized(containerd, registry, image_cache) -> PushedImage:  # type: ignore[no-untyped-def]
    files = [FileSpec("etc", kind="dir"), FileSpec("etc/hot.conf", data=b"hot\n" * 3000)]
    files += [FileSpec(f"cold{index}.bin", data=os.urandom(200_000)) for index in range(6)]
    return image_cache.get(
        ("test_lazy_blobs", "prioritized"),
        lambda: build_image(containerd, registry, "lazy/prioritized", [files], prioritized_files=["etc/hot.conf"]),
    )


def _cached_chunks(root: SnapshotRoot, digest_hex: str) -> tuple[int, int]:
    cache = root.root / "cache"
    _, entries = decode_blob_meta((cache / layout.blob_meta_name(digest_hex)).read_bytes())
    bitmap = chunkmap.decode((cache / layout.chunk_map_name(digest_hex)).read_bytes(), len(entries))
    return chunkmap.count(bitmap, len(entries)), len(entries)


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["prefetch", "no-prefetch", "background"])
def test_prefetch_and_background_fetch(prioritized, snapdb, daemons, tmp_path: Path, mode: str) -> None:
    chain = image_chain(prioritized)
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root", {"s": chain}))
    extra = {"prefetch": (), "no-prefetch": ("--no-prefetch",), "background": ("--background-fetch",)}[mode]
    daemon = daemons(root.root, *extra)
    digest_hex = hex_of(chain[0].digest)
    os.stat(daemon.mountpoint / root.sid("s") / digest_hex)
    with open(daemon.mountpoint / ".blobs" / digest_hex, "rb"):  # a first open, no read
        if mode == "background":
            _wait(lambda: _cached_chunks(root, digest_hex)[0] == _cached_chunks(root, digest_hex)[1], "everything")
        elif mode == "prefetch":
            _wait(lambda: "prefetching" in daemon.log_text() and _cached_chunks(root, digest_hex)[0] >= 1, "prefetch")
            time.sleep(0.5)
        else:
            time.sleep(1.0)
    cached, total = _cached_chunks(root, digest_hex)
    if mode == "prefetch":
        assert 1 <= cached < total  # the prioritized file, not the cold ones
    elif mode == "no-prefetch":
        assert cached == 0
    else:
        assert cached == total


def test_status_shows_blob_figures_and_the_lazy_dir_is_not_listed(stacked, snapdb, mount_image,
                                                                  tmp_path: Path) -> None:
    chain = image_chain(stacked["gzip"])
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root", {"s": chain}))
    mounted = mount_image(root, root.sid("s", len(chain) - 1), "--no-prefetch")
    read_everything(mounted.target)
    assert ".blobs" not in os.listdir(mounted.daemon.mountpoint)  # only snapshot ids are listed
    names = os.listdir(mounted.daemon.mountpoint / ".blobs")
    assert names and all(len(name) == 64 for name in names)
    with pytest.raises(OSError) as readonly:
        open(mounted.daemon.mountpoint / ".blobs" / names[0], "r+b")
    assert readonly.value.errno == errno.EROFS
    partly = {row["layer_hex"]: row for row in json.loads(cli("status", root.root, "--json").stdout)["blobs"]}
    for name in names:  # a file an upper layer hides was never read, so not all of its chunks
        assert 0 < partly[name]["chunks_cached"] <= partly[name]["chunks"] and partly[name]["fetched_bytes"] > 0
        (mounted.daemon.mountpoint / ".blobs" / name).read_bytes()
    done = cli("status", root.root, "--json")
    assert done.returncode == 0, done.stderr
    blobs = {row["layer_hex"]: row for row in json.loads(done.stdout)["blobs"]}
    for name in names:
        assert blobs[name]["chunks_cached"] == blobs[name]["chunks"] > 0
    table = cli("status", root.root).stdout
    assert f"blob {names[0][:12]}: {blobs[names[0]]['chunks']}/{blobs[names[0]]['chunks']} chunks cached" in table


def test_mount_image_refuses_what_it_cannot_mount(stacked, snapdb, daemons, tmp_path: Path) -> None:
    chain = image_chain(stacked["gzip"])
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root", {"s": chain}))
    daemon = daemons(root.root)
    target = tmp_path / "target"
    target.mkdir()
    for args, code, words in [
        ((tmp_path, "1", target), 2, "not a stargzfs mount"),
        ((daemon.mountpoint, "../x", target), 2, "not a snapshot id"),
        ((daemon.mountpoint, "999", target), 1, "no image.boot"),
        ((daemon.mountpoint, "1", tmp_path / "missing"), 2, "not a directory"),
    ]:
        done = cli("mount-image", *args)
        assert done.returncode == code and words in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not target.is_mount()

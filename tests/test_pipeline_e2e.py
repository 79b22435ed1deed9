"""The lazy pipeline end to end, through a real `stargzfs mount` of a real snapshotter root.

Real parts only: eStargz images made by ctr-remote and served by docker-registry, a
metadata.db written by containerd's own snapshots/storage (Go helper), the daemon started
by the `stargzfs` CLI, and the kernel (erofs, overlayfs) as the judge of what it built.
One root, one metadata.db and shared images serve most tests; each test uses its own
snapshot chains whose layer digests no other chain of that root shares (layers are fetched
and built once per digest, so a shared digest would couple tests), so the tests do not
depend on each other's order. Tests that need a digest in several chains, or settings of
their own, get a fresh root (`fresh_root`).
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import re
import socket
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.erofs import (
    erofs_mounted,
    extract_layer_tar,
    overlay_mounted,
    tree_snapshot,
)
from support.fake_nydus_image import (
    read_journal,
    running_builds,
    write_fake_nydus_image,
)
from support.images import (
    FileSpec,
    PushedImage,
    build_image,
    make_layer_tar,
    upload_blob,
)
from support.registry import RegistryProcess
from support.snapshot_root import (
    IMAGE_BOOT,
    ChainLayer,
    Daemon,
    SnapshotRoot,
    hex_of,
    image_chain,
    image_cli_ok,
    lstat_errno,
    status,
    write_root,
)
from support.stacks import (
    eight_layers,
    stacked_image,
    stacked_layers,
    stacked_overlay_lowers,
)
from support.storm import stat_storm

from stargzfs.estargz.gzip_codec import encode_footer as encode_gzip_footer
from stargzfs.snapshots.store import LABEL_NYDUS_META_LAYER


@dataclass
class World(SnapshotRoot):
    """The module's one root, the images its chains come from, and the escape-bait dirs."""

    gzip: PushedImage
    zstd: PushedImage
    eight: PushedImage
    plain: PushedImage
    private: RegistryProcess
    outside: Path  # a dir outside ROOT the daemon must never write to
    work: Path


@pytest.fixture(scope="module")
def world(containerd, registry, image_cache, snapdb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    gzip_image = stacked_image(image_cache, containerd, registry, "gzip")
    zstd_image = stacked_image(image_cache, containerd, registry, "zstd")
    eight = image_cache.get(
        ("test_pipeline_e2e", "eight"),
        lambda: build_image(containerd, registry, "pipeline-e2e/eight", eight_layers(), compression="gzip"),
    )
    plain = image_cache.get(
        ("test_pipeline_e2e", "plain"),
        lambda: build_image(containerd, registry, "pipeline-e2e/plain", eight_layers()[:1], compression="plain"),
    )
    private = RegistryProcess(tmp_path_factory.mktemp("private-registry"))
    private.seed_from(registry)
    private.start()
    try:
        work = tmp_path_factory.mktemp("e2e")
        root = work / "root"
        outside = work / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_text("outside ROOT\n")
        e = image_chain(eight)
        private_ref = f"{private.host}/{eight.repository}:{eight.tag}"
        chains = {
            "gz": image_chain(gzip_image),
            "zs": image_chain(zstd_image),
            "down": [ChainLayer(private_ref, e[0].digest, e[0].toc_digest)],
            "kill": [e[1]],
            "swap": [e[2]],
            "mixed": [ChainLayer(plain.ref, plain.layers[0].digest), e[3]],
            "plain": image_chain(plain),
            "nydus": [ChainLayer(e[4].ref, e[4].digest, extra_labels={LABEL_NYDUS_META_LAYER: "true"})],
            "planted": [e[5]],
            "symfs": [e[6]],
        }
        container = {"op": "active", "key": "k8s.io/99/container", "parent": "sha256:gz-3", "labels": {}}
        ids = write_root(snapdb, root, chains, [container])
        world = World(root, ids, gzip_image, zstd_image, eight, plain, private, outside, work)
        # a nydus meta layer as the snapshotter leaves it
        (world.fs("nydus") / "image").mkdir()
        (world.fs("nydus") / "image" / "image.boot").write_bytes(b"not ours to touch")
        # escape bait: a planted bootstrap symlink, and an fs dir that is a symlink
        os.symlink(outside / "secret.txt", world.fs("planted") / hex_of(e[5].digest))
        symfs = world.fs("symfs")
        symfs.rmdir()
        symfs.symlink_to(outside, target_is_directory=True)
        yield world
    finally:
        private.stop()


@pytest.fixture
def fresh_root(snapdb, tmp_path: Path) -> Callable[[dict[str, list[ChainLayer]]], SnapshotRoot]:
    """A root of the test's own (cheap: one snapdb run), for chains that must not meet the world's."""

    def make(chains: dict[str, list[ChainLayer]]) -> SnapshotRoot:
        root = tmp_path / "root"
        return SnapshotRoot(root, write_root(snapdb, root, chains))

    return make


@pytest.fixture
def silent_registry() -> Iterator[str]:
    """host:port that accepts TCP connections (kernel backlog) and never answers a byte."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def passthrough_probe(root: SnapshotRoot, mnt: Path, chain: str) -> Callable[[int], int]:
    """stat(n): create a new file in `chain`'s fs dir and stat it through the mount.

    A never-looked-up name cannot be answered from the kernel's dentry/attr caches, so each
    call is a real FUSE request the daemon has to serve. Returns the size it saw.
    """
    (root.fs(chain) / "probe").mkdir(exist_ok=True)

    def probe(number: int) -> int:
        name = f"fresh-{number}-{time.monotonic_ns()}"
        (root.fs(chain) / "probe" / name).write_bytes(b"p" * number)
        return os.stat(mnt / root.sid(chain) / "probe" / name).st_size

    return probe


def layer_oracle(work: Path, name: str, files: list[FileSpec]) -> Path:
    """The layer's tar extracted by GNU tar: what its bootstrap must show."""
    target = work / f"oracle-{name}"
    if not target.exists():
        extract_layer_tar(make_layer_tar(files, work / f"oracle-{name}.tar"), target)
    return target


def device_for(work: Path, image: PushedImage, index: int, blob_meta: Path) -> Path:
    """Materialize one layer's blob cache (the erofs `device=`) from its blob.meta."""
    layer = image.layers[index]
    blob = work / f"{hex_of(layer.digest)}.blob"
    device = work / f"{hex_of(layer.digest)}.dev"
    if not device.exists():
        blob.write_bytes(layer.blob())
        image_cli_ok("materialize", "--blob-meta", blob_meta, "--blob", blob, "-o", device)
    return device


def compare_merged(world: World, image: PushedImage, merged: Path, metas: dict[int, Path]) -> None:
    """The merged bootstrap on the kernel's erofs == overlayfs of the extracted layers."""
    devices = [device_for(world.work, image, index, metas[index]) for index in sorted(metas)]
    with overlay_mounted(stacked_overlay_lowers(world.work / "overlay-oracle")) as view:
        expected = tree_snapshot(view, uid_gid=False)
    with erofs_mounted(merged, devices) as mounted:
        actual = tree_snapshot(mounted, uid_gid=False)
    expected.pop("/"), actual.pop("/")
    assert actual == expected


# ------------------------------------------------------------------------------------ tests
def test_fusedev_lookup_converts_layers_and_open_merges(world: World, daemons) -> None:
    daemon = daemons(world.root)
    mnt = daemon.mountpoint
    top = world.sid("gz", 3)
    hexes = [hex_of(layer.digest) for layer in world.gzip.layers]
    assert sorted(os.listdir(mnt / top)) == sorted([hexes[3], IMAGE_BOOT])  # listed before they exist
    assert os.listdir(world.fs("gz", 3)) == []  # listing converts nothing
    assert world.sid("gz", 3) in os.listdir(mnt) and world.ids["k8s.io/99/container"] in os.listdir(mnt)
    assert os.listdir(mnt / world.ids["k8s.io/99/container"]) == []  # active snapshot: nothing virtual

    info = os.stat(mnt / world.sid("gz", 0) / hexes[0])  # the stat runs the conversion
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o440
    base_fs = world.fs("gz", 0)
    assert sorted(os.listdir(base_fs)) == sorted([hexes[0], "stargz.index.json"])
    assert stat.S_IMODE((base_fs / "stargz.index.json").stat().st_mode) == 0o440
    meta0 = world.root / "cache" / f"{hexes[0]}.blob.meta"
    assert meta0.is_file()
    assert (mnt / world.sid("gz", 0) / hexes[0]).read_bytes() == (base_fs / hexes[0]).read_bytes()
    device = device_for(world.work, world.gzip, 0, meta0)
    oracle = layer_oracle(world.work, "gz0", stacked_layers()[0])
    with erofs_mounted(base_fs / hexes[0], [device]) as mounted:
        actual = tree_snapshot(mounted, uid_gid=False)
    expected = tree_snapshot(oracle, uid_gid=False)
    expected.pop("/"), actual.pop("/")
    assert actual == expected

    with open(mnt / top / IMAGE_BOOT, "rb") as handle:  # open merges the whole chain
        merged_bytes = handle.read()
    merged = world.fs("gz", 3) / IMAGE_BOOT
    assert merged.read_bytes() == merged_bytes and stat.S_IMODE(merged.stat().st_mode) == 0o440
    for index, digest_hex in enumerate(hexes):
        assert (world.fs("gz", index) / digest_hex).is_file()
    assert not [n for n in os.listdir(world.fs("gz", 3)) if n.startswith(("converting", "merging", "."))]
    metas = {i: world.root / "cache" / f"{h}.blob.meta" for i, h in enumerate(hexes)
             if (world.root / "cache" / f"{h}.blob.meta").exists()}
    assert len(metas) == 3  # the data-free top layer has no blob.meta
    compare_merged(world, world.gzip, merged, metas)
    rows = status(world.root)
    assert rows[top]["image_status"] == "merged" and rows[top]["layer_status"] == "converted"
    assert rows[top]["blob_meta"] == [] and rows[world.sid("gz", 0)]["blob_meta"] == ["fusedev"]


def test_fscache_zstd_placement_and_merge(world: World, daemons) -> None:
    daemon = daemons(world.root, "--fs-driver", "fscache")
    top = world.sid("zs", 3)
    hexes = [hex_of(layer.digest) for layer in world.zstd.layers]
    before = set(os.listdir(world.root / "cache")) if (world.root / "cache").exists() else set()
    merged_bytes = (daemon.mountpoint / top / IMAGE_BOOT).read_bytes()  # builds all 4 layers, then merges
    top_names = set(os.listdir(world.fs("zs", 3)))
    assert top_names == {hexes[3], "stargz.index.json", IMAGE_BOOT} | {f"{h}.blob.meta" for h in hexes[:3]}
    metas = {}
    for index, digest_hex in enumerate(hexes[:3]):
        own = world.fs("zs", index) / f"{digest_hex}.blob.meta"
        assert own.is_file() and (world.fs("zs", 3) / own.name).read_bytes() == own.read_bytes()
        metas[index] = own
    cache_now = set(os.listdir(world.root / "cache")) if (world.root / "cache").exists() else set()
    assert not {name for name in cache_now - before if name.startswith(tuple(hexes))}
    merged = world.fs("zs", 3) / IMAGE_BOOT
    assert merged.read_bytes() == merged_bytes
    compare_merged(world, world.zstd, merged, metas)


def test_parallel_lookups_convert_each_layer_once(world: World, fresh_root, daemons, registry: RegistryProcess,
                                                  tmp_path: Path) -> None:
    root = fresh_root({"eight": image_chain(world.eight), "pt": image_chain(world.plain)})
    journal = tmp_path / "journal.jsonl"
    slow = write_fake_nydus_image(tmp_path / "slow", journal=journal, sleep=3)  # keeps conversions in progress
    daemon = daemons(root.root, "--nydus-image", slow, config={"max_builders": 8})
    mnt = daemon.mountpoint
    hexes = [hex_of(layer.digest) for layer in world.eight.layers]
    targets = [mnt / root.sid("eight", i) / digest_hex for i, digest_hex in enumerate(hexes)]
    probe = passthrough_probe(root, mnt, "pt")
    mark = registry.mark()
    with stat_storm(targets, 64, timeout=120) as results:
        _wait_for(lambda: bool(running_builds(journal)), "a builder to start")
        for number in range(10):  # each a real request, each answered while a builder still runs
            assert probe(number) == number
            assert running_builds(journal), f"probe {number} was only answered after the builders finished"
    assert all(isinstance(size, int) and size > 0 for size in results), results
    for layer in world.eight.layers:
        fetches = registry.requests_for(layer.digest, since=mark)
        assert len(fetches) == 1, (layer.digest, fetches)  # one ranged GET: footer + TOC
    assert sorted(call["argv"][6] for call in read_journal(journal)) == sorted(hexes)  # one builder each
    log = daemon.log_text()
    for index in range(8):
        assert len(re.findall(rf"snapshot {root.sid('eight', index)}: converted layer", log)) == 1


@pytest.mark.parametrize("fs_driver", ["fusedev", "fscache"])
def test_same_layer_in_several_chains_is_fetched_and_built_once(world: World, fresh_root, daemons, fs_driver: str,
                                                                registry: RegistryProcess, tmp_path: Path) -> None:
    layer = world.eight.layers[7]
    digest_hex = hex_of(layer.digest)
    one = [ChainLayer(world.eight.ref, layer.digest, layer.toc_digest)]
    root = fresh_root({"a": one, "b": one, "c": one})
    journal = tmp_path / "journal.jsonl"
    slow = write_fake_nydus_image(tmp_path / "slow", journal=journal, sleep=1)  # a and b overlap for sure
    daemon = daemons(root.root, "--nydus-image", slow, "--fs-driver", fs_driver)
    mnt = daemon.mountpoint
    mark = registry.mark()
    outcome: dict[str, int] = {}
    barrier = threading.Barrier(2)

    def look(chain: str) -> None:
        barrier.wait()
        outcome[chain] = lstat_errno(mnt / root.sid(chain) / digest_hex)

    lookers = [threading.Thread(target=look, args=(chain,)) for chain in ("a", "b")]
    for thread in lookers:
        thread.start()
    for thread in lookers:
        thread.join(timeout=120)
    assert outcome == {"a": 0, "b": 0}
    assert lstat_errno(mnt / root.sid("c") / digest_hex) == 0  # later: a copy too
    assert len(registry.requests_for(layer.digest, since=mark)) == 1  # one TOC fetch in all
    assert [call["argv"][0] for call in read_journal(journal)] == ["create"]  # one builder run
    outputs = [digest_hex, "stargz.index.json"] + ([f"{digest_hex}.blob.meta"] if fs_driver == "fscache" else [])
    first = {name: (root.fs("a") / name).read_bytes() for name in outputs}
    for chain in ("a", "b", "c"):
        fs = root.fs(chain)
        assert sorted(os.listdir(fs)) == sorted(outputs)  # fscache: each dir is nydusd's work dir
        for name in outputs:
            assert (fs / name).read_bytes() == first[name], (chain, name)
        for name in outputs[:2]:  # (the builder's own blob.meta keeps the builder's mode)
            assert stat.S_IMODE((fs / name).stat().st_mode) == 0o440, (chain, name)
    image_cli_ok("check", "--bootstrap", root.fs("c") / digest_hex)
    log = daemon.log_text()
    assert len(re.findall(r"converted layer", log)) == 1 and len(re.findall(r"copied layer", log)) == 2
    rows = status(root.root)
    assert all(rows[root.sid(chain)]["layer_status"] == "converted" for chain in ("a", "b", "c"))


def test_slow_credential_helper_does_not_stall_other_requests(world: World, fresh_root, daemons,
                                                              registry: RegistryProcess, tmp_path: Path) -> None:
    # docker-credential-* helpers are external programs we do not install: a script stands in.
    layer = world.eight.layers[6]
    root = fresh_root({"slow": [ChainLayer(world.eight.ref, layer.digest, layer.toc_digest)],
                       "pt": image_chain(world.plain)})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper_log = tmp_path / "helper.log"
    helper = bin_dir / "docker-credential-slow"
    helper.write_text(
        "#!/bin/sh\n"
        f'echo start >> "{helper_log}"\n'
        "sleep 3\n"
        f'echo end >> "{helper_log}"\n'
        'echo "credentials not found in native keychain"\nexit 1\n'
    )
    helper.chmod(0o755)
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    (docker_config / "config.json").write_text(json.dumps({"credHelpers": {registry.host: "slow"}}))
    daemon: Daemon = daemons(root.root, env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                             "DOCKER_CONFIG": str(docker_config)})
    mnt = daemon.mountpoint
    probe = passthrough_probe(root, mnt, "pt")
    assert probe(1) == 1
    outcome: list[int] = []
    looker = threading.Thread(
        target=lambda: outcome.append(lstat_errno(mnt / root.sid("slow") / hex_of(layer.digest))))
    looker.start()
    _wait_for(lambda: helper_log.exists() and helper_log.read_text() == "start\n", "the credential helper to start")
    assert probe(2) == 2  # answered while the helper still sleeps ...
    assert helper_log.read_text() == "start\n"  # ... i.e. before the conversion could go on
    looker.join(timeout=60)
    assert outcome == [0]  # "not found" in the helper: anonymous pull, converted
    assert helper_log.read_text() == "start\nend\n"


def test_registry_timeout_and_retries_bound_a_silent_registry(world: World, fresh_root, daemons,
                                                             silent_registry: str) -> None:
    layer = world.eight.layers[0]
    ref = f"{silent_registry}/{world.eight.repository}:{world.eight.tag}"
    root = fresh_root({"silent": [ChainLayer(ref, layer.digest, layer.toc_digest)]})
    daemon = daemons(root.root, "--registry-timeout", "1", "--registry-retries", "0")
    target = daemon.mountpoint / root.sid("silent") / hex_of(layer.digest)
    started = time.monotonic()
    assert lstat_errno(target) == errno.EIO
    assert time.monotonic() - started < 30  # guards against a hang; the defaults would take ~41 s
    row = status(root.root)[root.sid("silent")]
    assert row["layer_status"] == "error"
    assert re.search(r"timed out|within 1s", row["layer_error"]) and "after 1 attempts" in row["layer_error"]
    assert os.listdir(root.fs("silent")) == []


def test_registry_down_gives_eio_then_recovers(world: World, daemons) -> None:
    daemon = daemons(world.root, config={"retry_backoff": 0.2, "retry_backoff_max": 0.2})
    target = daemon.mountpoint / world.sid("down") / hex_of(world.eight.layers[0].digest)
    world.private.stop()
    try:
        assert lstat_errno(target) == errno.EIO
        row = status(world.root)[world.sid("down")]
        assert row["layer_status"] == "error" and "cannot connect" in row["layer_error"]
        assert not (world.fs("down") / hex_of(world.eight.layers[0].digest)).exists()
    finally:
        world.private.start()
    for _ in range(50):  # the first lookup after the backoff retries
        if lstat_errno(target) == 0:
            break
        time.sleep(0.1)
    assert stat.S_ISREG(os.lstat(target).st_mode)
    assert status(world.root)[world.sid("down")]["layer_status"] == "converted"


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_kill9_mid_conversion_leaves_nothing_partial(world: World, daemons, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    slow = write_fake_nydus_image(tmp_path / "slow", journal=journal, sleep=60)
    daemon = daemons(world.root, "--nydus-image", slow)
    digest_hex = hex_of(world.eight.layers[1].digest)
    target = daemon.mountpoint / world.sid("kill") / digest_hex
    outcome: list[int] = []
    looker = threading.Thread(target=lambda: outcome.append(lstat_errno(target)))
    looker.start()
    fs_dir = world.fs("kill")
    # (not listed through the mount meanwhile: the kernel serializes readdir with the pending lookup)
    _wait_for(lambda: len(read_journal(journal)) == 1, "the builder to start")
    _wait_for(lambda: [n for n in os.listdir(fs_dir) if re.fullmatch(r"converting-stargz[0-9a-f]+", n)],
              "the partial bootstrap temp")
    daemon.kill9()
    looker.join(timeout=30)
    assert outcome and outcome[0] not in (0, errno.ENOENT)
    assert not (fs_dir / digest_hex).exists()  # only the hidden temp was ever written

    again = daemons(world.root)
    assert not [n for n in os.listdir(fs_dir) if "converting" in n or "merging" in n]  # removed at start-up
    assert sorted(os.listdir(again.mountpoint / world.sid("kill"))) == sorted([digest_hex, IMAGE_BOOT, "stargz.index.json"])
    redo = again.mountpoint / world.sid("kill") / digest_hex
    assert stat.S_ISREG(os.stat(redo).st_mode)
    image_cli_ok("check", "--bootstrap", fs_dir / digest_hex)
    time.sleep(0.5)  # the killed builder (PDEATHSIG) must not write anything late
    assert sorted(os.listdir(fs_dir)) == sorted([digest_hex, "stargz.index.json"])


def test_plain_layers_enoent_remembered_and_nydus_layers_untouched(world: World, daemons, registry) -> None:
    daemon = daemons(world.root)
    mnt = daemon.mountpoint
    plain_dir = mnt / world.sid("plain")
    plain_hex = hex_of(world.plain.layers[0].digest)
    assert plain_hex in os.listdir(plain_dir)
    mark = registry.mark()
    assert lstat_errno(plain_dir / plain_hex) == errno.ENOENT
    assert lstat_errno(plain_dir / plain_hex) == errno.ENOENT  # remembered: no second detection
    assert len(registry.requests_for(world.plain.layers[0].digest, since=mark)) == 1
    assert os.listdir(plain_dir) == []
    assert os.listdir(world.fs("plain")) == []
    assert status(world.root)[world.sid("plain")]["layer_status"] == "not-estargz"

    mixed_top = mnt / world.sid("mixed", 1)
    assert lstat_errno(mixed_top / IMAGE_BOOT) == errno.ENOENT  # one layer of the chain is plain
    row = status(world.root)[world.sid("mixed", 1)]
    assert row["image_status"] == "not-estargz" and "not eStargz" in row["image_error"]
    assert f"layer snapshot {world.sid('mixed', 0)}" in row["image_error"]
    assert os.listdir(mixed_top) == [hex_of(world.eight.layers[3].digest)]  # image.boot no longer offered

    nydus_dir = mnt / world.sid("nydus")
    assert os.listdir(nydus_dir) == ["image"]
    assert lstat_errno(nydus_dir / hex_of(world.eight.layers[4].digest)) == errno.ENOENT
    assert lstat_errno(nydus_dir / IMAGE_BOOT) == errno.ENOENT
    assert sorted(p.name for p in world.fs("nydus").rglob("*")) == ["image", "image.boot"]


def test_escape_attempts_never_leave_root(world: World, daemons, tmp_path: Path) -> None:
    secret = world.outside / "secret.txt"
    before = (secret.read_bytes(), secret.stat().st_mtime_ns, sorted(os.listdir(world.outside)))
    journal = tmp_path / "journal.jsonl"
    slow = write_fake_nydus_image(tmp_path / "slow", journal=journal, sleep=2)
    daemon = daemons(world.root, "--nydus-image", slow)
    mnt = daemon.mountpoint

    planted_hex = hex_of(world.eight.layers[5].digest)
    assert stat.S_ISLNK(os.lstat(mnt / world.sid("planted") / planted_hex).st_mode)  # shown, not followed
    assert lstat_errno(mnt / world.sid("planted") / IMAGE_BOOT) == errno.EIO  # never merged through it
    assert world.sid("symfs") not in os.listdir(mnt)
    assert lstat_errno(mnt / world.sid("symfs")) == errno.ENOENT

    swap_fs = world.fs("swap")
    swap_hex = hex_of(world.eight.layers[2].digest)
    outcome: list[int] = []
    looker = threading.Thread(target=lambda: outcome.append(lstat_errno(mnt / world.sid("swap") / swap_hex)))
    looker.start()
    _wait_for(lambda: len(read_journal(journal)) == 1, "the builder to start")
    moved = swap_fs.with_name("fs.moved")
    swap_fs.rename(moved)
    swap_fs.symlink_to(world.outside, target_is_directory=True)  # the rename-during-lookup attack
    looker.join(timeout=60)
    try:
        assert outcome == [0]
        assert (moved / swap_hex).is_file() and (moved / "stargz.index.json").is_file()
        assert (world.root / "cache" / f"{swap_hex}.blob.meta").is_file()
    finally:
        swap_fs.unlink()
        moved.rename(swap_fs)
    assert (secret.read_bytes(), secret.stat().st_mtime_ns, sorted(os.listdir(world.outside))) == before
    assert read_journal(journal)[0]["ok"]


def test_files_built_in_other_dirs_invalidate_their_cached_attrs(world: World, daemons, fresh_root) -> None:
    """Opening image.boot builds the lower layers' bootstraps in *their* dirs; with long attr
    timeouts the kernel would keep showing those dirs' old attributes unless the daemon says so."""
    root = fresh_root({"inv": image_chain(world.gzip)[:2]})
    daemon = daemons(root.root, config={"attr_timeout": 60.0, "entry_timeout": 60.0})
    lower_dir = daemon.mountpoint / root.sid("inv", 0)
    before = os.stat(lower_dir)  # cached for 60 s from now on
    time.sleep(0.02)  # let the real dir's mtime move when the bootstrap lands
    with open(daemon.mountpoint / root.sid("inv", 1) / IMAGE_BOOT, "rb") as handle:
        assert handle.read(1)
    real = os.stat(root.fs("inv", 0))
    assert real.st_mtime_ns != before.st_mtime_ns  # the conversion wrote into the lower dir
    assert os.stat(lower_dir).st_mtime_ns == real.st_mtime_ns


# ------------------------------------------------------------------------------------ review fixes (issue #6)
def inner_offset_layer() -> bytes:
    """A gzip eStargz blob whose two files share one member (estargz >= 0.13 innerOffset layout).

    fetch_toc accepts it; RAFS v6 cannot describe it, so stargzfs-image exits 6 (unsupported).
    """
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name in ("a", "b"):
            info = tarfile.TarInfo(f"./{name}")
            info.size = 5
            archive.addfile(info, io.BytesIO(name.encode() * 5))
    blob = bytearray(gzip.compress(payload.getvalue(), mtime=0))
    toc = json.dumps({"version": 1, "entries": [
        {"name": "./", "type": "dir", "mode": 0o755},
        {"name": "./a", "type": "reg", "mode": 0o644, "size": 5, "offset": 0, "innerOffset": 512},
        {"name": "./b", "type": "reg", "mode": 0o644, "size": 5, "offset": 0, "innerOffset": 1536},
    ]}).encode()
    toc_member = io.BytesIO()
    with tarfile.open(fileobj=toc_member, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc)
        archive.addfile(info, io.BytesIO(toc))
    toc_offset = len(blob)
    blob += gzip.compress(toc_member.getvalue(), mtime=0)
    blob += encode_gzip_footer(toc_offset)
    return bytes(blob)


def test_builder_rejection_is_not_convertible_and_remembered(world: World, fresh_root, daemons,
                                                              registry: RegistryProcess) -> None:
    digest = upload_blob(registry, world.eight.repository, inner_offset_layer())
    root = fresh_root({"inner": [ChainLayer(world.eight.ref, digest)]})
    daemon = daemons(root.root, config={"retry_backoff": 0.01, "retry_backoff_max": 0.01})
    target = daemon.mountpoint / root.sid("inner") / hex_of(digest)
    mark = registry.mark()
    assert lstat_errno(target) == errno.ENOENT  # not EIO: retrying cannot help
    row = status(root.root)[root.sid("inner")]
    assert row["layer_status"] == "not-estargz"
    assert "stargzfs-image rejected its TOC" in row["layer_error"] and "innerOffset" in row["layer_error"]
    assert "\n" not in row["layer_error"]
    time.sleep(0.05)  # well past the EIO backoff: a retry would fetch the TOC again
    assert lstat_errno(target) == errno.ENOENT
    assert len(registry.requests_for(digest, since=mark)) == 1  # remembered, not re-fetched
    assert os.listdir(daemon.mountpoint / root.sid("inner")) == []  # no longer offered
    assert os.listdir(root.fs("inner")) == []  # nothing partial left behind


def test_write_failure_in_one_snapshot_dir_does_not_back_off_the_digest(world: World, fresh_root,
                                                                        daemons) -> None:
    layer = world.eight.layers[7]
    digest_hex = hex_of(layer.digest)
    one = [ChainLayer(world.eight.ref, layer.digest, layer.toc_digest)]
    root = fresh_root({"broken": one, "fine": one})
    (root.fs("broken") / "stargz.index.json").mkdir()  # the TOC cannot be written there
    daemon = daemons(root.root, config={"retry_backoff": 600, "retry_backoff_max": 600})
    mnt = daemon.mountpoint
    assert lstat_errno(mnt / root.sid("broken") / digest_hex) == errno.EIO
    row = status(root.root)[root.sid("broken")]
    assert row["layer_status"] == "error" and "writing outputs" in row["layer_error"]
    assert lstat_errno(mnt / root.sid("fine") / digest_hex) == 0  # the digest itself is fine
    assert (root.fs("fine") / digest_hex).is_file()
    assert "retry in" not in daemon.log_text()


def test_errors_name_the_layer_digest_once(world: World, fresh_root, daemons, silent_registry: str) -> None:
    layer = world.eight.layers[1]
    ref = f"{silent_registry}/{world.eight.repository}:{world.eight.tag}"
    root = fresh_root({"once": [ChainLayer(ref, layer.digest, layer.toc_digest)]})
    daemon = daemons(root.root, "--registry-timeout", "0.5", "--registry-retries", "0")
    assert lstat_errno(daemon.mountpoint / root.sid("once") / hex_of(layer.digest)) == errno.EIO
    error = status(root.root)[root.sid("once")]["layer_error"]
    assert error.count(hex_of(layer.digest)) == 1, error
    assert error.startswith(f"snapshot {root.sid('once')}: fetching TOC: "), error


def test_startup_sweeps_and_hides_temps_only_in_candidate_dirs(world: World, snapdb, daemons,
                                                               tmp_path: Path) -> None:
    root_dir = tmp_path / "root"
    container = {"op": "active", "key": "k8s.io/7/container", "parent": "sha256:cand-0", "labels": {}}
    root = SnapshotRoot(root_dir, write_root(snapdb, root_dir, {"cand": image_chain(world.plain)}, [container]))
    container_id = root.ids["k8s.io/7/container"]
    user_names = ["converting-stargz-notes.txt", "merging-stargz.log"]
    for fs_dir in (root_dir / "snapshots" / container_id / "fs", root_dir / "snapshots" / "9999" / "fs"):
        fs_dir.mkdir(parents=True, exist_ok=True)
        for name in user_names:
            (fs_dir / name).write_text("the user's\n")
    (root.fs("cand") / "converting-stargzdeadbeef").write_bytes(b"partial")
    daemon = daemons(root_dir, "--rw")
    mnt = daemon.mountpoint
    assert not (root.fs("cand") / "converting-stargzdeadbeef").exists()
    assert f"removed stale temp snapshots/{root.sid('cand')}/fs/converting-stargzdeadbeef" in daemon.log_text()
    for fs_dir in (root_dir / "snapshots" / container_id / "fs", root_dir / "snapshots" / "9999" / "fs"):
        assert sorted(os.listdir(fs_dir)) == user_names  # not ours: untouched
    assert sorted(os.listdir(mnt / container_id)) == user_names  # and shown
    (mnt / container_id / "converting-stargz-new").write_text("mine")  # and creatable
    assert (root_dir / "snapshots" / container_id / "fs" / "converting-stargz-new").read_text() == "mine"
    with pytest.raises(PermissionError):
        (mnt / root.sid("cand") / "converting-stargz-new").write_text("not here")

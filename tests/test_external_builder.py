"""The external-builder path: `--nydus-image` (or a bare name on PATH) with version detection.

The real nydus-image cannot be installed here, so a fake stands at that process boundary
(tests/support/fake_nydus_image.py): it checks its argv strictly for the form its version
accepts (v2.1: `--blob-meta`; v2.2+: `--blob-data-size 0x<TOC offset>`) and then runs the
real `stargzfs-image`, so everything downstream is genuine. Everything else is real: images
from ctr-remote in docker-registry, containerd's metadata.db, the `stargzfs mount` daemon.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stargzfs.estargz.fetch import read_toc_file
from support.fake_nydus_image import read_journal, write_fake_nydus_image
from support.images import PushedImage
from support.snapshot_root import (
    IMAGE_BOOT,
    STARGZFS,
    SnapshotRoot,
    hex_of,
    image_chain,
    image_cli_ok,
    lstat_errno,
    status,
    write_root,
)
from support.stacks import stacked_image


@dataclass
class Root(SnapshotRoot):
    """The module's root with chains of the stacked gzip and zstd images."""

    gzip: PushedImage
    zstd: PushedImage


@pytest.fixture(scope="module")
def ext_root(containerd, registry, image_cache, snapdb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    gzip_image = stacked_image(image_cache, containerd, registry, "gzip")
    zstd_image = stacked_image(image_cache, containerd, registry, "zstd")
    root = tmp_path_factory.mktemp("external") / "root"
    chains = {
        "v21": image_chain(gzip_image),
        "zs": image_chain(zstd_image)[:1],
    }
    yield Root(root, write_root(snapdb, root, chains), gzip_image, zstd_image)


def test_v2_1_on_path_gets_the_seed_argv_and_builds_a_mergeable_image(ext_root: Root, daemons, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    fake_dir = write_fake_nydus_image(tmp_path / "bin", version="v2.1.6", journal=journal).parent
    daemon = daemons(ext_root.root, "--nydus-image", "nydus-image",
                     env={"PATH": f"{fake_dir}:{os.environ['PATH']}"})
    merged = (daemon.mountpoint / ext_root.sid("v21", 3) / IMAGE_BOOT).read_bytes()
    calls = read_journal(journal)
    assert all(call["ok"] for call in calls), calls
    creates = [call["argv"] for call in calls if call["argv"][0] == "create"]
    merges = [call["argv"] for call in calls if call["argv"][0] == "merge"]
    hexes = [hex_of(layer.digest) for layer in ext_root.gzip.layers]
    assert sorted(argv[6] for argv in creates) == sorted(hexes)
    assert all(argv[13] == "--blob-meta" and "--blob-data-size" not in argv for argv in creates)
    assert len(merges) == 1 and [Path(source).name for source in merges[0][3:]] == hexes  # base first
    assert (ext_root.fs("v21", 3) / IMAGE_BOOT).read_bytes() == merged
    image_cli_ok("check", "--bootstrap", ext_root.fs("v21", 3) / IMAGE_BOOT)
    assert (ext_root.root / "cache" / f"{hexes[0]}.blob.meta").is_file()


def test_v2_2_gets_blob_data_size_instead_of_blob_meta(ext_root: Root, snapdb, daemons, tmp_path: Path) -> None:
    # A root of its own: in ext_root this digest is v21's base layer, which the mount would copy
    # from v21's dir (one build per digest) instead of running the builder.
    own = tmp_path / "root"
    root = SnapshotRoot(own, write_root(snapdb, own, {"v22": image_chain(ext_root.gzip)[:1]}))
    journal = tmp_path / "journal.jsonl"
    fake = write_fake_nydus_image(tmp_path / "bin", version="v2.2.4", journal=journal)
    daemon = daemons(root.root, "--nydus-image", fake)
    layer = ext_root.gzip.layers[0]
    blob = tmp_path / "layer.blob"
    blob.write_bytes(layer.blob())
    toc_offset = read_toc_file(blob).footer.toc_offset
    os.stat(daemon.mountpoint / root.sid("v22") / hex_of(layer.digest))
    (call,) = read_journal(journal)
    assert call["ok"], call
    assert call["argv"][13:15] == ["--blob-data-size", f"0x{toc_offset:x}"] and "--blob-meta" not in call["argv"]
    image_cli_ok("check", "--bootstrap", root.fs("v22") / hex_of(layer.digest))


def test_zstd_layer_is_not_estargz_for_an_external_builder(ext_root: Root, daemons, tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    fake = write_fake_nydus_image(tmp_path / "bin", version="v2.1.6", journal=journal)
    daemon = daemons(ext_root.root, "--nydus-image", fake)
    target = daemon.mountpoint / ext_root.sid("zs") / hex_of(ext_root.zstd.layers[0].digest)
    assert lstat_errno(target) == errno.ENOENT
    assert read_journal(journal) == []
    row = status(ext_root.root)[ext_root.sid("zs")]
    assert row["layer_status"] == "not-estargz" and "gzip eStargz only" in row["layer_error"]


@pytest.mark.parametrize("version", ["v2.0.1", None])
def test_unusable_builder_fails_the_mount(ext_root: Root, tmp_path: Path, version: str | None) -> None:
    if version is None:
        builder = tmp_path / "no-such-nydus-image"
    else:
        builder = write_fake_nydus_image(tmp_path / "bin", version=version, journal=tmp_path / "journal")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = subprocess.run([STARGZFS, "mount", str(ext_root.root), str(mountpoint), "--nydus-image", str(builder)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "nydus-image" in done.stderr
    assert os.listdir(mountpoint) == []

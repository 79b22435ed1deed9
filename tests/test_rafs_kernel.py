"""Builder acceptance: `stargzfs-image create` → `materialize` → the kernel's erofs shows the layer.

Oracles are independent of our code: nydus's own expected results for its fixtures, the TOC's
content digests, fsck.erofs, and for real ctr-remote images (gzip and zstd) a GNU tar
extraction of the very tar the image was made from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from stargzfs.estargz.fetch import read_toc_file
from stargzfs.estargz.toc import HIDDEN_ROOT_NAMES, parse_toc
from stargzfs.rafs.blobmeta import blob_meta_header_for, decode_blob_meta
from support.erofs import erofs_mounted, extract_layer_tar, fsck_erofs, tree_snapshot
from support.images import FileSpec, build_image, make_layer_tar
from support.paths import NYDUS_FIXTURES
from support.snapshot_root import image_cli

EMPTY_ID = "db30bb2870067ed3e0e73c7448d9f0b529169da8295b5b5155b417624d861d81"
LOWER_ID = "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
UPPER_ID = "5aabe268d8139e952bfff14b2dd0f43fcfef4f2c38b63ea782486ce7268d4954"
FOUR_MIB = 4 << 20


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}: {result.stderr}"
    return result


@dataclass(frozen=True)
class Built:
    """One layer through the pipeline: bootstrap, blob.meta (None when no data) and cache file."""

    toc_path: Path
    bootstrap: Path
    blob_meta: Path | None
    device: Path | None

    @property
    def devices(self) -> list[Path]:
        return [self.device] if self.device else []


def build_layer(
    workdir: Path, name: str, toc_path: Path, blob_id: str, blob: Path | None, *,
    repeatable: bool = True, compressor: str | None = None,
) -> Built:
    """Run exactly the snapshotter's create command, then check and materialize."""
    bootstrap, meta = workdir / name, workdir / f"{name}.blob.meta"
    args: list[str | Path] = ["create", "--source-type", "stargz_index", "--bootstrap", bootstrap,
                              "--blob-id", blob_id]
    if repeatable:
        args.append("--repeatable")
    args += ["--disable-check", "--fs-version", "6", "--chunk-size", "0x400000", "--blob-meta", meta]
    if compressor:
        args += ["--compressor", compressor]
    ok(image_cli(*args, toc_path))
    if not meta.exists():
        ok(image_cli("check", "--bootstrap", bootstrap))
        return Built(toc_path, bootstrap, None, None)
    ok(image_cli("check", "--bootstrap", bootstrap, "--blob-meta", meta))
    assert blob is not None
    device = workdir / f"{name}.dev"
    ok(image_cli("materialize", "--blob-meta", meta, "--blob", blob, "-o", device, "--toc", toc_path))
    return Built(toc_path, bootstrap, meta, device)


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def md5_file(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def result_md5s(name: str) -> dict[str, str]:
    """The `md5sum` part of a nydus *.result file: path → md5."""
    text = (NYDUS_FIXTURES / name).read_text()
    return {m[2]: m[1] for m in re.finditer(r"^([0-9a-f]{32})  (/.*?)$", text, re.M)}


def result_tree(name: str) -> set[tuple[str, str]]:
    """The `tree -J` part of a nydus *.result file: {(path, file|directory|link)}."""
    text = (NYDUS_FIXTURES / name).read_text()
    doc = json.loads(text[: text.rindex("]") + 1])
    found: set[tuple[str, str]] = set()

    def walk(node: dict, prefix: str) -> None:
        for child in node.get("contents", []):
            path = f"{prefix}/{child['name']}"
            found.add((path, child["type"]))
            walk(child, path)

    walk(doc[0], "")
    return found


def mounted_tree(root: Path) -> set[tuple[str, str]]:
    kinds = {"reg": "file", "dir": "directory", "symlink": "link"}
    return {(path, kinds[rec["type"]]) for path, rec in tree_snapshot(root).items() if path != "/"}


# --------------------------------------------------------------------------------------------------
# nydus v2.1.6 smoke-test fixtures


@pytest.fixture(scope="module")
def nydus_layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    workdir = tmp_path_factory.mktemp("nydus-layers")
    blobs = NYDUS_FIXTURES / "blobs"
    return {
        "empty": build_layer(workdir, EMPTY_ID, NYDUS_FIXTURES / "stargz.index-empty.json", EMPTY_ID, None),
        "lower": build_layer(workdir, LOWER_ID, NYDUS_FIXTURES / "stargz.index-lower.json", LOWER_ID,
                             blobs / LOWER_ID),
        "upper": build_layer(workdir, UPPER_ID, NYDUS_FIXTURES / "stargz.index-upper.json", UPPER_ID,
                             blobs / UPPER_ID),
    }


def test_fixture_outputs_have_v2_1_shapes(nydus_layers: dict[str, Built]) -> None:
    """Sizes from rafs-v6 spec §9: empty has no blob.meta; lower has 28 chunk references."""
    assert nydus_layers["empty"].blob_meta is None
    assert nydus_layers["empty"].bootstrap.stat().st_size % 4096 == 0
    header, chunks = decode_blob_meta(nydus_layers["lower"].blob_meta.read_bytes())  # type: ignore[union-attr]
    assert header == blob_meta_header_for(28) and len(chunks) == 28
    assert [c.uncompressed_offset for c in chunks] == sorted(c.uncompressed_offset for c in chunks)
    assert {c.compressed_offset for c in chunks} == {
        c.offset for e in parse_toc(nydus_layers["lower"].toc_path.read_bytes()).entries for c in e.chunks
    }
    for built in nydus_layers.values():
        assert built.bootstrap.stat().st_size % 4096 == 0


@pytest.mark.parametrize("name", ["empty", "lower", "upper"])
def test_fixture_fsck_erofs(nydus_layers: dict[str, Built], name: str) -> None:
    built = nydus_layers[name]
    result = fsck_erofs(built.bootstrap, built.devices)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["lower", "upper"])
def test_fixture_files_match_toc_digests(nydus_layers: dict[str, Built], name: str) -> None:
    built = nydus_layers[name]
    toc = parse_toc(built.toc_path.read_bytes())
    with erofs_mounted(built.bootstrap, built.devices) as root:
        checked = 0
        for entry in toc.entries:
            if entry.type == "reg":
                path = root / entry.name
                assert path.stat().st_size == entry.size, entry.name
                assert sha256_file(path) == entry.digest, entry.name
                checked += 1
    assert checked == sum(1 for e in toc.entries if e.type == "reg") > 5


def test_fixture_empty_lower_stack_matches_lower_result(nydus_layers: dict[str, Built]) -> None:
    """lower.result is nydus's expectation for the empty → lower stack."""
    expected_md5 = result_md5s("lower.result")
    expected_tree = result_tree("lower.result")
    empty, lower = nydus_layers["empty"], nydus_layers["lower"]
    with erofs_mounted(empty.bootstrap) as root:
        assert mounted_tree(root) == {("/empty-file", "file")}
        assert md5_file(root / "empty-file") == expected_md5.pop("/empty-file")
    with erofs_mounted(lower.bootstrap, lower.devices) as root:
        assert mounted_tree(root) | {("/empty-file", "file")} == expected_tree
        assert {path: md5_file(root / path[1:]) for path in expected_md5} == expected_md5


def test_fixture_lower_metadata(nydus_layers: dict[str, Built]) -> None:
    lower = nydus_layers["lower"]
    emoji = "test-😉-name." * 17
    with erofs_mounted(lower.bootstrap, lower.devices) as root:
        assert stat.S_IMODE((root).stat().st_mode) == 0o755  # no TOC root entry: stargzfs uses 0755
        large = (root / "root-large").stat()
        assert (root / "sub/sub-root-large-hardlink").stat().st_ino == large.st_ino
        assert large.st_nlink == 2
        copy = (root / "root-large-copy").stat()
        group = [root / "sub/sub-root-large-copy-hardlink", root / "sub/sub-root-large-copy-hardlink-1"]
        assert {p.stat().st_ino for p in group} == {copy.st_ino} and copy.st_nlink == 3
        assert copy.st_ino != large.st_ino
        assert os.readlink(root / "sub/sub-root-large-symlink") == "../root-large"
        assert (root / "sub/sub-root-large-symlink").read_bytes() == (root / "root-large").read_bytes()
        assert len(emoji.encode()) == 255 and (root / emoji).stat().st_size == 15
        sub1 = root / "sub/sub-1"
        assert sorted(os.listxattr(sub1)) == ["user.key-bar", "user.key-foo"]
        assert os.getxattr(sub1, "user.key-foo") == b"value-foo"
        assert os.getxattr(sub1, "user.key-bar") == b"value-bar"


def test_fixture_upper_keeps_whiteouts_and_matches_overlay_result(nydus_layers: dict[str, Built]) -> None:
    upper = nydus_layers["upper"]
    expected = result_md5s("overlay.result")
    with erofs_mounted(upper.bootstrap, upper.devices) as root:
        for whiteout in ["sub/more/.wh..wh..opq", "sub/.wh.sub-2", "sub/.wh.some", ".wh.root-large", ".wh.root-2"]:
            info = (root / whiteout).lstat()
            assert stat.S_ISREG(info.st_mode) and info.st_size == 0, whiteout
        for path in ["/sub/sub-1", "/sub/more/more-1", "/sub/more/more-sub/more-sub-2"]:
            assert md5_file(root / path[1:]) == expected[path]


# --------------------------------------------------------------------------------------------------
# real eStargz from ctr-remote, gzip and zstd

EMOJI_NAME = "😉" * 63 + "end"  # 255 bytes


def _random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def layer_files() -> list[FileSpec]:
    """Every entry kind; `hl-first` is a hardlink listed before its target."""
    multi = _random_bytes(1, 2 * FOUR_MIB + 12345)  # 3 chunks
    return [
        FileSpec("dir", kind="dir", mode=0o755, mtime=1_600_000_100),
        FileSpec("dir/hl-first", kind="hardlink", target="dir/target", mtime=1_600_000_101),
        FileSpec("dir/target", data=b"shared by two names\n", mode=0o640, uid=1000, gid=1001,
                 xattrs={"user.origin": b"target"}, mtime=1_600_000_102),
        FileSpec("dir/sub", kind="dir", mode=0o2750, uid=3, gid=4, mtime=1_600_000_103),
        FileSpec("dir/sub/deep.txt", data=b"deep\n" * 100, mtime=1_600_000_104),
        FileSpec("dir/gone", kind="whiteout", mtime=1_600_000_105),
        FileSpec("dir/sub", kind="opaque", mtime=1_600_000_106),
        FileSpec("tmp", kind="dir", mode=0o1777, mtime=1_600_000_107),
        FileSpec("empty", data=b"", mtime=1_600_000_108),
        FileSpec("small", data=b"small file\n", mode=0o600, uid=65534, gid=65534,
                 xattrs={"user.b": b"2", "user.a": b"\x00binary\xff"}, mtime=1_600_000_109),
        FileSpec("exact-4m", data=_random_bytes(2, FOUR_MIB), mtime=1_600_000_110),
        FileSpec("multi-chunk", data=multi, mode=0o755, mtime=1_600_000_111),
        FileSpec("compressible", data=b"A" * (FOUR_MIB + 1), mtime=1_600_000_112),
        FileSpec("setuid-bin", data=b"#!/bin/sh\n", mode=0o4755, mtime=1_600_000_113),
        FileSpec("hl-after", kind="hardlink", target="small", mtime=1_600_000_114),
        FileSpec("link-rel", kind="symlink", target="dir/target", mtime=1_600_000_115),
        FileSpec("link-dangling", kind="symlink", target="/does/not/exist", mtime=1_600_000_116),
        FileSpec("fifo", kind="fifo", mode=0o600, mtime=1_600_000_117),
        FileSpec("null", kind="char", major=1, minor=3, mode=0o666, mtime=1_600_000_118),
        FileSpec("loop9", kind="block", major=7, minor=9, mode=0o660, gid=6, mtime=1_600_000_119),
        FileSpec("ünïcødé-文件.txt", data="grüße\n".encode(), mtime=1_600_000_120),
        FileSpec(EMOJI_NAME, data=b"long name\n", mtime=1_600_000_121),
    ]


def oracle_files(files: list[FileSpec]) -> list[FileSpec]:
    """Same tree with each hardlink after its target, so a plain tar extraction can create it."""
    return [f for f in files if f.kind != "hardlink"] + [f for f in files if f.kind == "hardlink"]


@pytest.fixture(scope="module")
def oracle_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("oracle")
    tar = make_layer_tar(oracle_files(layer_files()), workdir / "layer.tar")
    extract_layer_tar(tar, workdir / "root")
    return workdir / "root"


@pytest.fixture(scope="module", params=["gzip", "zstd"])
def estargz_layer(request: pytest.FixtureRequest, containerd, registry, image_cache,  # type: ignore[no-untyped-def]
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path, str]:
    """(compression, blob file, TOC file, layer digest hex) of a real ctr-remote image."""
    compression: str = request.param
    image = image_cache.get(
        ("test_rafs_kernel", compression),
        lambda: build_image(containerd, registry, f"rafs-kernel/{compression}", [layer_files()],
                            compression=compression),
    )
    layer = image.layers[0]
    workdir = tmp_path_factory.mktemp(f"estargz-{compression}")
    blob = workdir / "blob"
    blob.write_bytes(layer.blob())
    toc_path = workdir / "toc.json"
    toc_path.write_bytes(read_toc_file(blob).raw)
    return compression, blob, toc_path, layer.digest.split(":", 1)[1]


@pytest.mark.parametrize("repeatable", [True, False], ids=["repeatable", "explicit-uid-gid"])
def test_estargz_mount_equals_tar_extraction(
    estargz_layer: tuple[str, Path, Path, str], oracle_tree: Path, repeatable: bool,
    tmp_path: Path,
) -> None:
    compression, blob, toc_path, blob_id = estargz_layer
    toc = parse_toc(toc_path.read_bytes())
    assert HIDDEN_ROOT_NAMES & {e.name for e in toc.entries}, "expected a landmark in a ctr-remote TOC"
    assert any(len(e.chunks) == 3 for e in toc.entries if e.name == "multi-chunk")
    built = build_layer(tmp_path, blob_id, toc_path, blob_id, blob, repeatable=repeatable,
                        compressor="zstd" if compression == "zstd" else None)
    fsck = fsck_erofs(built.bootstrap, built.devices)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    expected = tree_snapshot(oracle_tree, uid_gid=not repeatable)
    with erofs_mounted(built.bootstrap, built.devices) as root:
        actual = tree_snapshot(root, uid_gid=not repeatable)
        if repeatable:
            assert {(rec.st_uid, rec.st_gid) for rec in map(os.lstat, _all_paths(root))} == {(0, 0)}
    assert not HIDDEN_ROOT_NAMES & {path.lstrip("/") for path in actual}
    expected.pop("/"), actual.pop("/")  # the extraction root is a temp dir, not part of the layer
    assert actual == expected


def _all_paths(root: Path) -> list[Path]:
    paths = [root]
    for parent, dirs, files in os.walk(root):
        paths += [Path(parent) / name for name in dirs + files]
    return paths

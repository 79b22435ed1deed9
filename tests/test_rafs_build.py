"""TOC → RAFS v6: nydus's fixtures against the spec's reference values, a crafted layer with
every entry kind judged by fsck.erofs and the kernel's erofs driver, and every rejection."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from stargzfs.errors import FormatError, UnsupportedError, UsageError
from stargzfs.estargz.fetch import FileRangeReader
from stargzfs.estargz.toc import parse_toc
from stargzfs.rafs import from_toc
from stargzfs.rafs.blobmeta import decode_blob_meta
from stargzfs.rafs.build import BuildResult, build_bootstrap, build_bootstrap_from_toc_file
from stargzfs.rafs.check import check_bootstrap
from stargzfs.rafs.materialize import materialize
from stargzfs.rafs.merge import merge_bootstraps
from stargzfs.rafs.ondisk import (
    FLAG_COMPRESS_ZSTD,
    FLAG_EXPLICIT_UID_GID,
    FLAG_HAS_XATTR,
    BlobEntry,
    ExtSuperBlock,
    SuperBlock,
)
from stargzfs.rafs.reader import BootstrapReader
from support.erofs import erofs_mounted, fsck_erofs, tree_snapshot
from support.paths import NYDUS_FIXTURES
from support.toc_cases import REJECTIONS, toc_bytes

EMPTY_ID = "db30bb2870067ed3e0e73c7448d9f0b529169da8295b5b5155b417624d861d81"
LOWER_ID = "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
UPPER_ID = "5aabe268d8139e952bfff14b2dd0f43fcfef4f2c38b63ea782486ce7268d4954"
CRAFTED_ID = "c" * 64
MIB = 1 << 20
MTIME = "2021-02-03T04:05:06Z"
MTIME_SECONDS = 1612325106


def build_fixture(name: str, blob_id: str) -> BuildResult:
    toc = parse_toc((NYDUS_FIXTURES / f"stargz.index-{name}.json").read_bytes())
    return build_bootstrap(toc, blob_id=blob_id)


def materialize_device(blob_meta: bytes, blob: Path, out: Path) -> Path:
    trio.run(lambda: materialize(blob_meta, FileRangeReader(blob), out))
    return out


@pytest.fixture(scope="session")
def fixture_builds() -> dict[str, BuildResult]:
    return {name: build_fixture(name, blob) for name, blob in
            (("empty", EMPTY_ID), ("lower", LOWER_ID), ("upper", UPPER_ID))}


# --- nydus fixtures ----------------------------------------------------------------------

def test_empty_reference_values(fixture_builds: dict[str, BuildResult], tmp_path: Path) -> None:
    result = fixture_builds["empty"]
    assert len(result.bootstrap) == 8192
    assert result.blob_meta is None and result.chunk_count == 0
    sb = SuperBlock.unpack(result.bootstrap)
    assert (sb.extra_devices, sb.meta_blkaddr, sb.root_nid, sb.inos) == (0, 0, 128, 2)
    boot = tmp_path / "empty.boot"
    boot.write_bytes(result.bootstrap)
    proc = fsck_erofs(boot)
    assert proc.returncode == 0, proc.stderr


def test_lower_reference_values(fixture_builds: dict[str, BuildResult], tmp_path: Path) -> None:
    result = fixture_builds["lower"]
    assert len(result.bootstrap) == 20480
    assert result.chunk_count == 28
    assert result.blob_meta is not None and len(result.blob_meta) == 8192
    sb = SuperBlock.unpack(result.bootstrap)
    assert (sb.extra_devices, sb.meta_blkaddr, sb.root_nid, sb.inos) == (1, 2, 128, 19)
    ext = ExtSuperBlock.unpack(result.bootstrap)
    assert ext.flags == 0x48 | FLAG_HAS_XATTR  # gzip + sha256 + xattrs, no explicit uid/gid
    assert (ext.blob_table_offset, ext.blob_table_size, ext.chunk_size) == (4096, 256, 0x400000)
    blob = BlobEntry.unpack(result.bootstrap, 4096)
    assert blob.blob_id == LOWER_ID.encode() and blob.chunk_count == 28 and blob.ci_compressed_size == 28 * 16
    header, chunks = decode_blob_meta(result.blob_meta)
    assert header.ci_entries == 28 and len(chunks) == 28
    assert check_bootstrap(result.bootstrap, {0: result.blob_meta}).ok
    boot, dummy = tmp_path / "lower.boot", tmp_path / "dummy"
    boot.write_bytes(result.bootstrap)
    with dummy.open("wb") as handle:
        handle.truncate(32 * MIB)
    proc = fsck_erofs(boot, [dummy])
    assert proc.returncode == 0, proc.stderr


def test_lower_extracts_to_nydus_md5s(fixture_builds: dict[str, BuildResult], tmp_path: Path) -> None:
    """fsck.erofs --extract over the real blob reproduces lower.result (minus /empty-file,
    which comes from the `empty` layer below it)."""
    result = fixture_builds["lower"]
    assert result.blob_meta is not None
    device = materialize_device(result.blob_meta, NYDUS_FIXTURES / "blobs" / LOWER_ID, tmp_path / "dev")
    boot = tmp_path / "lower.boot"
    boot.write_bytes(result.bootstrap)
    out = tmp_path / "x"
    proc = subprocess.run(["fsck.erofs", f"--device={device}", f"--extract={out}", str(boot)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = {}
    for line in (NYDUS_FIXTURES / "lower.result").read_text().splitlines():
        if line.strip() and not line.startswith(("[", "]", " ", "{")) and "  /" in line:
            digest, path = line.split("  ", 1)
            expected[path] = digest
    expected.pop("/empty-file")
    got = {"/" + p.relative_to(out).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
           for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    assert got == expected
    assert (out / "sub" / "sub-root-large-symlink").readlink() == Path("../root-large")


def test_upper_keeps_whiteouts_as_empty_files(fixture_builds: dict[str, BuildResult]) -> None:
    from stargzfs.rafs.reader import read_bootstrap

    image = read_bootstrap(fixture_builds["upper"].bootstrap)
    whiteouts = {path: node for path, node in image.walk() if node.name.startswith(b".wh.")}
    assert b"/sub/more/.wh..wh..opq" in whiteouts and b"/.wh.root-large" in whiteouts
    assert all(stat.S_ISREG(n.mode) and n.size == 0 for n in whiteouts.values())


# --- a crafted layer with every entry kind, judged by the kernel ------------------------

@dataclass
class Layer:
    toc: bytes
    blob: bytes
    expected: dict[str, dict]


def _pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest() * 128  # 4 KiB
    return (block * (size // len(block) + 1))[:size]


def craft_layer(chunk_size: int = 4 * MIB) -> Layer:
    """A blob of gzip members (one per chunk) + its TOC + what a mount must show."""
    blob = bytearray(b"\0" * 10)  # a TOC offset of 0 would mean "no data"
    entries: list[dict] = []
    expected: dict[str, dict] = {}

    def meta(path: str, kind: str, mode: int, uid: int = 0, gid: int = 0, **extra: object) -> dict:
        record = {"type": kind, "mode": oct(mode), "xattrs": [], "mtime": MTIME_SECONDS, "uid": uid,
                  "gid": gid, "link_group": None}
        record.update(extra)
        key = "" if path == "./" else path.strip("/")
        expected["/" + key] = record
        return {"name": path, "type": {"reg": "reg", "dir": "dir", "symlink": "symlink", "fifo": "fifo",
                                       "char": "char", "block": "block"}[kind],
                "mode": mode, "uid": uid, "gid": gid, "modtime": MTIME}

    def add_file(path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0,
                 xattrs: dict[str, bytes] | None = None) -> None:
        entry = meta(path, "reg", mode, uid, gid, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        entry["size"] = len(data)
        entry["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
        if xattrs:
            entry["xattrs"] = {k: base64.b64encode(v).decode() for k, v in xattrs.items()}
            expected["/" + path]["xattrs"] = sorted((k, v.hex()) for k, v in xattrs.items())
        if not data:
            entries.append(entry)
            return
        for start in range(0, len(data), chunk_size):
            piece = data[start:start + chunk_size]
            record = entry if start == 0 else {"name": path, "type": "chunk", "chunkOffset": start}
            record["offset"] = len(blob)
            if len(piece) == chunk_size:
                record["chunkSize"] = chunk_size
            record["chunkDigest"] = "sha256:" + hashlib.sha256(piece).hexdigest()
            if start:
                entries.append(record)
            else:
                entries.append(entry)
            blob.extend(gzip.compress(piece, mtime=0))

    entries.append(meta("./", "dir", 0o750))
    entries.append({"name": ".no.prefetch.landmark", "type": "reg", "size": 1, "offset": len(blob),
                    "digest": "sha256:" + hashlib.sha256(b"\x0f").hexdigest()})
    blob.extend(gzip.compress(b"\x0f", mtime=0))
    entries.append(meta("dir/", "dir", 0o2775, 1000, 1001))
    add_file("dir/empty", b"")
    add_file("dir/small", b"hello\n", uid=1000, gid=1001)
    add_file("dir/.prefetch.landmark", b"\x0f")  # hidden only at the root
    # hardlink listed before its target; target in another directory
    entries.append({"name": "hl-first", "type": "hardlink", "linkName": "dir/target-later", "mode": 0o644})
    add_file("dir/target-later", b"linked content\n", mode=0o640)
    entries.append({"name": "hl-second", "type": "hardlink", "linkName": "hl-first", "mode": 0o644})
    for path in ("/hl-first", "/dir/target-later", "/hl-second"):
        expected[path] = dict(expected["/dir/target-later"], link_group="/dir/target-later")
    add_file("exactly-4m", _pattern(4 * MIB, 1))
    add_file("multi-chunk", _pattern(9 * MIB + 123, 2))
    add_file("xattr-file", b"x", xattrs={"user.zeta": b"last", "user.alpha": b"\x00\x01binary"})
    add_file("setuid", b"#!/bin/sh\n", mode=0o4755)
    entries.append(meta("sticky/", "dir", 0o1777))
    entries.append(dict(meta("sym", "symlink", 0o777, size=9, target="dir/small"), linkName="dir/small"))
    entries.append(meta("fifo", "fifo", 0o600))
    entries.append(dict(meta("null", "char", 0o666, rdev=(1, 3)), devMajor=1, devMinor=3))
    entries.append(dict(meta("loop0", "block", 0o660, rdev=(7, 300)), devMajor=7, devMinor=300))
    add_file("ünïcødé-名前", b"unicode\n")
    add_file("n" * 255, b"long name\n")
    add_file(".wh.gone", b"")
    entries.append(meta("many/", "dir", 0o755))
    for i in range(300):
        add_file(f"many/entry-with-a-longish-name-{i:04d}", b"")
    deep = "/".join(["d"] * 40)
    add_file(deep + "/bottom", b"deep\n")
    parts = deep.split("/")
    for depth in range(1, len(parts) + 1):  # implicit parents: 0755 root-owned, mtime 0
        expected["/" + "/".join(parts[:depth])] = {"type": "dir", "mode": oct(0o755), "xattrs": [], "mtime": 0,
                                                   "uid": 0, "gid": 0, "link_group": None}
    entries.append({"name": "stargz.index.json", "type": "reg", "size": 1, "offset": len(blob)})
    blob.extend(gzip.compress(b"{", mtime=0))
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    return Layer(toc, bytes(blob), expected)


@pytest.fixture(scope="session")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layer, BuildResult, Path, Path]:
    layer = craft_layer()
    result = build_bootstrap(parse_toc(layer.toc), blob_id=CRAFTED_ID, repeatable=False)
    work = tmp_path_factory.mktemp("crafted")
    (work / "blob").write_bytes(layer.blob)
    boot = work / "boot"
    boot.write_bytes(result.bootstrap)
    assert result.blob_meta is not None
    device = materialize_device(result.blob_meta, work / "blob", work / "dev")
    return layer, result, boot, device


def test_crafted_layer_passes_fsck_and_check(crafted: tuple[Layer, BuildResult, Path, Path]) -> None:
    _, result, boot, device = crafted
    proc = fsck_erofs(boot, [device])
    assert proc.returncode == 0, proc.stderr
    report = check_bootstrap(result.bootstrap, {0: result.blob_meta or b""})
    assert report.ok, report.errors
    assert not report.warnings


def test_crafted_layer_kernel_mount_matches_toc(crafted: tuple[Layer, BuildResult, Path, Path]) -> None:
    layer, _, boot, device = crafted
    with erofs_mounted(boot, [device]) as root:
        got = tree_snapshot(root)
        nlinks = {name: (root / name).lstat().st_nlink for name in ("hl-first", "dir", "many")}
    expected = layer.expected
    assert got.keys() == expected.keys()
    for path in expected:
        assert got[path] == expected[path], path
    assert nlinks == {"hl-first": 3, "dir": 2, "many": 2}


def test_crafted_layer_flags_and_ids(crafted: tuple[Layer, BuildResult, Path, Path]) -> None:
    _, result, _, _ = crafted
    ext = ExtSuperBlock.unpack(result.bootstrap)
    assert ext.flags & FLAG_EXPLICIT_UID_GID and ext.flags & FLAG_HAS_XATTR
    reader = BootstrapReader(result.bootstrap)
    records = reader.chunk_records()
    # exactly-4m (1) + multi-chunk (3) + small files; hardlinks add duplicate references
    assert len(records) == len({(r.block_id, r.blob_index) for r in records})
    assert result.chunk_count == reader.blob_entries()[0].chunk_count > len(records)


def test_repeatable_zeroes_owners_and_zstd_flag() -> None:
    layer = craft_layer()
    result = build_bootstrap(parse_toc(layer.toc), blob_id=CRAFTED_ID, repeatable=True, compressor="zstd")
    ext = ExtSuperBlock.unpack(result.bootstrap)
    assert not ext.flags & FLAG_EXPLICIT_UID_GID
    assert ext.flags & FLAG_COMPRESS_ZSTD and not ext.flags & 0x40
    assert BlobEntry.unpack(result.bootstrap, ext.blob_table_offset).compression_algo == 3
    assert all(node.uid == 0 and node.gid == 0 for _, node in result.image.walk())


def test_root_defaults_without_root_entry() -> None:
    toc = parse_toc(json.dumps({"version": 1, "entries": [{"name": "f", "type": "reg", "mode": 0o644}]}).encode())
    image = build_bootstrap(toc, blob_id=CRAFTED_ID).image
    assert image.root.mode == stat.S_IFDIR | 0o755
    assert list(image.root.children or {}) == [b"f"]


def test_duplicate_path_later_wins_and_keeps_children() -> None:
    entries = [
        {"name": "d/", "type": "dir", "mode": 0o700},
        {"name": "d/f", "type": "reg", "mode": 0o600},
        {"name": "d/", "type": "dir", "mode": 0o711},
        {"name": "g", "type": "reg", "mode": 0o600},
        {"name": "g", "type": "symlink", "linkName": "d/f", "mode": 0o777},
    ]
    image = build_bootstrap(parse_toc(json.dumps({"version": 1, "entries": entries}).encode()),
                            blob_id=CRAFTED_ID).image
    d = image.lookup("/d")
    assert d is not None and stat.S_IMODE(d.mode) == 0o711 and list(d.children or {}) == [b"f"]
    g = image.lookup("/g")
    assert g is not None and g.symlink == b"d/f"


def test_an_empty_directory_replaced_by_a_file_takes_no_children() -> None:
    """Only directories are indexed by path while the tree is built: a directory replaced
    by a file must leave that index, or a later `e/x` would land in the replaced node."""
    entries = [
        {"name": "e/", "type": "dir", "mode": 0o755},
        {"name": "e", "type": "reg", "mode": 0o644},
        {"name": "e/x", "type": "reg", "mode": 0o644},
    ]
    with pytest.raises(FormatError, match="'e' is used as a directory but is not one"):
        build_bootstrap(parse_toc(json.dumps({"version": 1, "entries": entries}).encode()), blob_id=CRAFTED_ID)


def test_hardlinks_find_files_and_the_latest_duplicate() -> None:
    """Hardlink targets are found through the tree (files are not indexed by path), and a
    duplicated target path means its last entry, as before."""
    entries = [
        {"name": "d/", "type": "dir", "mode": 0o755},
        {"name": "d/t", "type": "reg", "mode": 0o600},
        {"name": "d/t", "type": "reg", "mode": 0o640, "uid": 7},
        {"name": "d/deep/", "type": "dir", "mode": 0o755},
        {"name": "d/deep/u", "type": "reg", "mode": 0o604},
        {"name": "h1", "type": "hardlink", "linkName": "d/t"},
        {"name": "h2", "type": "hardlink", "linkName": "./d/deep/u"},
    ]
    image = build_bootstrap(parse_toc(json.dumps({"version": 1, "entries": entries}).encode()),
                            blob_id=CRAFTED_ID, repeatable=False).image
    h1, t, h2, u = (image.lookup(path) for path in ("/h1", "/d/t", "/h2", "/d/deep/u"))
    assert h1 is not None and t is not None and h2 is not None and u is not None
    assert (stat.S_IMODE(h1.mode), h1.uid) == (0o640, 7) and h1.link is t.link is not None
    assert stat.S_IMODE(h2.mode) == 0o604 and h2.link is u.link is not None


# --- output bytes, pinned ---------------------------------------------------------------
# sha256 of (bootstrap, blob.meta) as built at commit 12f1215, before the msgspec TOC model
# and the tree/writer/reader rework: a change here changes what nydusd and the kernel read,
# and needs a reason of its own. (scripts/bench.py build/merge pin the 10k-1M bench TOCs.)
PINNED = {
    "empty": ("39518d9222bed5c91ce4d3e21db2283a9c5ffce994faca677a555ae7d126adc0", None),
    "lower": ("fc3a4ec45dbb8a11a2e583c548651da9993a340f93c46f8719884fa775e245cb",
              "8745125f39e123e696fb6102e3ca83942dc9cbb674554b11467d62b85128642d"),
    "upper": ("93f8615919e21522f178a36226f40d643f465c81ef1b39d8c044363b6f2b83f0",
              "d1fd64b11694eeeca49f4f19c7c35b92e61ea8c79789294ce4e8813d803e1cd4"),
    "merged": ("66e8bd0ec8add1927a45241f65ddbeffbaa9b6e26db98ac62ba0b8feef85b54e", None),
    "crafted": ("ac3fb8fb54ccc061234c7d9d9de5e4f7fd96086615ce05902a0a3cbd3461423a",
                "3fa725b0e2067489acf397b222545cbd9a591d9304d6470fa362dae642fa2cc1"),
    "crafted-zstd": ("fa951407a7fa326b6d8e32196582ee7bf10697cb56e67733833c2f2a1645dc9a",
                     "3fa725b0e2067489acf397b222545cbd9a591d9304d6470fa362dae642fa2cc1"),
}


def _digests(bootstrap: bytes | bytearray, blob_meta: bytes | None = None) -> tuple[str, str | None]:
    return hashlib.sha256(bootstrap).hexdigest(), hashlib.sha256(blob_meta).hexdigest() if blob_meta else None


def test_output_bytes_are_pinned(fixture_builds: dict[str, BuildResult], tmp_path: Path) -> None:
    ids = {"empty": EMPTY_ID, "lower": LOWER_ID, "upper": UPPER_ID}
    for name, blob_id in ids.items():
        built = fixture_builds[name]
        assert _digests(built.bootstrap, built.blob_meta) == PINNED[name], name
        # the CLI's path (TOC read from a file, parsed without digests) gives the same bytes
        from_file = build_bootstrap_from_toc_file(NYDUS_FIXTURES / f"stargz.index-{name}.json", blob_id=blob_id)
        assert _digests(from_file.bootstrap, from_file.blob_meta) == PINNED[name], name
        (tmp_path / blob_id).write_bytes(built.bootstrap)
    merged = merge_bootstraps([tmp_path / blob_id for blob_id in ids.values()])
    assert _digests(merged.bootstrap) == PINNED["merged"]
    layer = craft_layer()
    result = build_bootstrap(parse_toc(layer.toc), blob_id=CRAFTED_ID, repeatable=False)
    assert _digests(result.bootstrap, result.blob_meta) == PINNED["crafted"]
    result = build_bootstrap(parse_toc(layer.toc), blob_id=CRAFTED_ID, repeatable=True, compressor="zstd")
    assert _digests(result.bootstrap, result.blob_meta) == PINNED["crafted-zstd"]


# --- rejections --------------------------------------------------------------------------

@pytest.mark.parametrize("raw, error, words", [(r[3], r[1], r[2]) for r in REJECTIONS],
                         ids=[r[0] for r in REJECTIONS])
def test_rejections(raw: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        build_bootstrap(parse_toc(raw), blob_id=CRAFTED_ID)


def test_too_many_chunk_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """The v2.1 blob.meta limit (0xFFFFF) lowered to 2 so the test stays small."""
    monkeypatch.setattr(from_toc, "MAX_ENTRIES", 2)
    raw = toc_bytes(*({"name": f"f{i}", "type": "reg", "size": 1, "offset": 10 + i} for i in range(3)))
    with pytest.raises(UnsupportedError, match="at most 2"):
        build_bootstrap(parse_toc(raw), blob_id=CRAFTED_ID)


@pytest.mark.parametrize("kwargs, words", [
    ({"blob_id": "abc"}, "64 lowercase hex"),
    ({"blob_id": CRAFTED_ID, "chunk_size": 0x3000}, "power of two"),
    ({"blob_id": CRAFTED_ID, "chunk_size": 0x2000000}, "power of two"),
    ({"blob_id": CRAFTED_ID, "compressor": "lz4"}, "compressor"),
])
def test_bad_parameters(kwargs: dict, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        build_bootstrap(parse_toc(toc_bytes()), **kwargs)

"""`stargzfs-image merge` judged by the kernel: merged erofs mount == overlayfs / nydus results.

Two oracles: nydus's own expected trees for its v2.1.6 stargz smoke test (`overlay.result`,
`lower.result`), and a kernel overlayfs mount of the extracted layer tars of real multi-layer
images converted by ctr-remote. The bootstraps under test are built, merged, checked and
materialized through the `stargzfs-image` CLI, exactly as the snapshotter drives it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from stargzfs.estargz.fetch import read_toc_file
from support.erofs import erofs_mounted, extract_layer_tar, fsck_erofs, overlay_mounted, tree_snapshot
from support.images import FileSpec, build_image, make_layer_tar
from support.paths import NYDUS_FIXTURES

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"

EMPTY_ID = "db30bb2870067ed3e0e73c7448d9f0b529169da8295b5b5155b417624d861d81"
LOWER_ID = "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
UPPER_ID = "5aabe268d8139e952bfff14b2dd0f43fcfef4f2c38b63ea782486ce7268d4954"


def image_cli(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `stargzfs-image` as a child process, the way the snapshotter side calls it."""
    command = [sys.executable, "-m", "stargzfs.image_cli", *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def image_cli_ok(*argv: str | Path) -> str:
    done = image_cli(*argv)
    assert done.returncode == 0, f"stargzfs-image {argv[0]} failed: {done.stderr}"
    return done.stdout


# ---------------------------------------------------------------------------------------------
# nydus's smoke-test oracle: `tree -J` JSON followed by `md5sum` lines


def parse_tree_result(path: Path) -> tuple[dict[str, tuple[str, str | None]], dict[str, str]]:
    """`overlay.result` → ({"/path": (kind, symlink target)}, {"/file": md5})."""
    text = path.read_text()
    closing = text.index("\n]") + 2
    document = json.loads(text[:closing])
    entries: dict[str, tuple[str, str | None]] = {}

    def walk(node: dict, prefix: str) -> None:
        for child in node.get("contents", []):
            child_path = f"{prefix}/{child['name']}"
            kind = {"directory": "dir", "file": "reg", "link": "symlink"}[child["type"]]
            entries[child_path] = (kind, child.get("target"))
            if kind == "dir":
                walk(child, child_path)

    walk(document[0], "")
    md5s = {}
    for line in text[closing:].splitlines():
        if line.strip():
            digest, name = line.split(None, 1)
            md5s[name] = digest
    return entries, md5s


def mounted_tree(root: Path) -> tuple[dict[str, tuple[str, str | None]], dict[str, str]]:
    """The same two views of a mounted filesystem."""
    entries: dict[str, tuple[str, str | None]] = {}
    md5s: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(directory) / name
            rel = "/" + full.relative_to(root).as_posix()
            if full.is_symlink():
                entries[rel] = ("symlink", os.readlink(full))
            elif full.is_dir():
                entries[rel] = ("dir", None)
            else:
                entries[rel] = ("reg", None)
                md5s[rel] = hashlib.md5(full.read_bytes()).hexdigest()
    return entries, md5s


@pytest.fixture(scope="module")
def nydus_stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """create empty/lower/upper exactly like nydus's test_stargz, plus their blob caches."""
    work = tmp_path_factory.mktemp("nydus-stack")
    cache = work / "cache"
    cache.mkdir()
    built: dict[str, Path] = {"work": work}
    for label, blob_id in (("empty", EMPTY_ID), ("lower", LOWER_ID), ("upper", UPPER_ID)):
        image_cli_ok(
            "create", "--source-type", "stargz_index", "--chunk-size", "0x400000",
            "--bootstrap", work / blob_id, "--blob-meta", cache / f"{blob_id}.blob.meta",
            "--blob-id", blob_id, "--fs-version", "6",
            NYDUS_FIXTURES / f"stargz.index-{label}.json",
        )
        built[label] = work / blob_id
    for blob_id in (LOWER_ID, UPPER_ID):
        device = cache / f"{blob_id}.img"
        image_cli_ok(
            "materialize", "--blob-meta", cache / f"{blob_id}.blob.meta",
            "--blob", NYDUS_FIXTURES / "blobs" / blob_id, "-o", device,
        )
        built[f"dev-{blob_id}"] = device
    return built


def blob_ids_of(bootstrap: Path) -> list[str]:
    from stargzfs.rafs.merge import read_source

    return [blob.blob_id for blob in read_source(bootstrap).blobs]


def test_nydus_smoke_stack_equals_overlay_result(nydus_stack: dict[str, Path]) -> None:
    merged = nydus_stack["work"] / "merged.boot"
    image_cli_ok("merge", "--bootstrap", merged, nydus_stack["empty"], nydus_stack["lower"], nydus_stack["upper"])
    cache = nydus_stack["work"] / "cache"
    report = image_cli_ok(
        "check", "--bootstrap", merged,
        "--blob-meta", cache / f"{LOWER_ID}.blob.meta", "--blob-meta", cache / f"{UPPER_ID}.blob.meta",
    )
    assert "check: OK" in report
    assert blob_ids_of(merged) == [LOWER_ID, UPPER_ID]  # empty has no data blob
    devices = [nydus_stack[f"dev-{LOWER_ID}"], nydus_stack[f"dev-{UPPER_ID}"]]
    fsck = fsck_erofs(merged, devices)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    expected = parse_tree_result(NYDUS_FIXTURES / "overlay.result")
    with erofs_mounted(merged, devices) as root:
        assert mounted_tree(root) == expected
        linked = [root / "root-large-copy", root / "sub/sub-root-large-copy-hardlink"]
        assert linked[0].stat().st_ino == linked[1].stat().st_ino
        assert os.listxattr(root / "sub/sub-1") == []  # upper's sub-1 replaced lower's, xattrs too


def test_nydus_empty_plus_lower_equals_lower_result(nydus_stack: dict[str, Path]) -> None:
    merged = nydus_stack["work"] / "lower-only.boot"
    image_cli_ok("merge", "--bootstrap", merged, nydus_stack["empty"], nydus_stack["lower"])
    image_cli_ok("check", "--bootstrap", merged)
    assert blob_ids_of(merged) == [LOWER_ID]
    expected = parse_tree_result(NYDUS_FIXTURES / "lower.result")
    with erofs_mounted(merged, [nydus_stack[f"dev-{LOWER_ID}"]]) as root:
        assert mounted_tree(root) == expected
        assert os.getxattr(root / "sub/sub-1", "user.key-foo") == b"value-foo"
        assert (root / "sub/sub-root-large-hardlink").stat().st_nlink == 2


# ---------------------------------------------------------------------------------------------
# overlayfs oracle for real multi-layer images


def to_overlay_form(layer_dir: Path, lower_dirs: Sequence[Path]) -> None:
    """Rewrite an extracted OCI layer into overlayfs's whiteout form, in place.

    `.wh.X` → char device 0:0 named X, `.wh..wh..opq` → trusted.overlay.opaque=y on its
    directory. A whiteout in a directory that no lower layer has hides nothing, so it is
    simply dropped: overlayfs would list such a whiteout as an unreadable entry when the
    directory is not merged, which no runtime ever shows (they apply whiteouts when
    unpacking). Directory mtimes are restored after the rewrite.
    """
    for directory, _dirnames, filenames in os.walk(layer_dir, topdown=False):
        here = Path(directory)
        markers = [name for name in filenames if name.startswith(WHITEOUT_PREFIX)]
        if not markers:
            continue
        times = here.stat()
        rel = here.relative_to(layer_dir)
        merged_below = any((lower / rel).is_dir() and not (lower / rel).is_symlink() for lower in lower_dirs)
        for name in markers:
            (here / name).unlink()
            if not merged_below:
                continue
            if name == OPAQUE_MARKER:
                os.setxattr(here, OVERLAY_OPAQUE_XATTR, b"y")
                continue
            if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                continue  # other AUFS meta files (.wh..wh.plnk …): ignored like containerd does
            hidden = here / name[len(WHITEOUT_PREFIX):]
            if hidden.is_dir() and not hidden.is_symlink():
                # re-created in this same layer: a fresh dir over the old one = an opaque dir
                os.setxattr(hidden, OVERLAY_OPAQUE_XATTR, b"y")
            elif not os.path.lexists(hidden):
                os.mknod(hidden, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        os.utime(here, ns=(times.st_atime_ns, times.st_mtime_ns))


def _data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


FIVE_MIB = 5 << 20  # two 4 MiB chunks: a file whose chunks must both land on the right device


def stacked_layers() -> list[list[FileSpec]]:
    """Four layers, base first, covering every whiteout/replacement case of issue #4; the last
    one carries no data blob. Hardlinks come after their targets so GNU tar can extract them."""
    base = [
        FileSpec("etc", kind="dir", mode=0o755, mtime=1_600_000_001),
        FileSpec("etc/keep.txt", data=b"kept from the base\n", xattrs={"user.origin": b"base"}, mtime=1_600_000_002),
        FileSpec("etc/remove-me.txt", data=b"deleted by layer 1\n", mtime=1_600_000_003),
        FileSpec("etc/later.txt", data=b"deleted by the data-free layer\n", mtime=1_600_000_003),
        FileSpec("etc/hl-a", data=b"two names, one inode\n", mode=0o640, uid=7, gid=8, mtime=1_600_000_004),
        FileSpec("etc/hl-b", kind="hardlink", target="etc/hl-a", mtime=1_600_000_004),
        FileSpec("etc/phantom", kind="whiteout", mtime=1_600_000_005),  # base whiteout: hides nothing
        FileSpec("ghost", kind="whiteout", mtime=1_600_000_005),
        FileSpec("olddir", kind="dir", mtime=1_600_000_006),
        FileSpec("olddir/a", data=b"must not resurface\n", mtime=1_600_000_007),
        FileSpec("olddir/sub", kind="dir", mtime=1_600_000_008),
        FileSpec("olddir/sub/b", data=b"nor this\n", mtime=1_600_000_009),
        FileSpec("opq", kind="dir", mtime=1_600_000_010),
        FileSpec("opq/x", data=b"hidden by an opaque dir\n", mtime=1_600_000_011),
        FileSpec("opq/y", kind="symlink", target="x", mtime=1_600_000_012),
        FileSpec("opq2", kind="dir", mtime=1_600_000_012),
        FileSpec("opq2/old", data=b"hidden for good\n", mtime=1_600_000_012),
        FileSpec("opq2/old-dir", kind="dir", mtime=1_600_000_012),
        FileSpec("will-be-dir", data=b"a file first\n", mtime=1_600_000_013),
        FileSpec("will-be-file", kind="dir", mtime=1_600_000_014),
        FileSpec("will-be-file/inner", data=b"gone with its dir\n", mtime=1_600_000_015),
        FileSpec("recreate.txt", data=b"first life\n", mtime=1_600_000_016),
        FileSpec("link", kind="symlink", target="etc/keep.txt", mtime=1_600_000_017),
        FileSpec("big", data=_data(1, FIVE_MIB), mtime=1_600_000_018),
        FileSpec("fifo", kind="fifo", mode=0o600, mtime=1_600_000_019),
        FileSpec("cycle", kind="dir", mtime=1_600_000_020),
        FileSpec("cycle/old", data=b"must stay buried under layer 1's file\n", mtime=1_600_000_020),
    ]
    layer1 = [
        FileSpec("etc", kind="dir", mode=0o750, uid=3, gid=4, mtime=1_600_001_001),
        FileSpec("etc/remove-me.txt", kind="whiteout", mtime=1_600_001_002),
        FileSpec("etc/hl-a", kind="whiteout", mtime=1_600_001_002),  # hl-b survives alone
        FileSpec("olddir", kind="whiteout", mtime=1_600_001_003),
        FileSpec("opq", kind="dir", mode=0o700, mtime=1_600_001_004),
        FileSpec("opq", kind="opaque", mtime=1_600_001_005),
        FileSpec("opq/z", data=b"the only child of opq\n", mtime=1_600_001_006),
        FileSpec("opq2", kind="dir", mtime=1_600_001_006),
        FileSpec("opq2/new", data=b"opaque from layer 1 on\n", mtime=1_600_001_006),
        FileSpec("opq2", kind="opaque", mtime=1_600_001_006),  # marker after a sibling
        FileSpec("will-be-dir", kind="dir", mtime=1_600_001_007),
        FileSpec("will-be-dir/child", data=b"a dir now\n", xattrs={"user.k": b"\x00\xffv"}, mtime=1_600_001_008),
        FileSpec("will-be-file", kind="whiteout", mtime=1_600_001_009),
        FileSpec("will-be-file", data=b"a file now\n", mtime=1_600_001_010),
        FileSpec("recreate.txt", kind="whiteout", mtime=1_600_001_011),
        FileSpec("bin", kind="dir", mtime=1_600_001_012),
        FileSpec("bin/tool", data=_data(2, 70_000), mode=0o755, mtime=1_600_001_013),
        FileSpec("bin/tool-alias", kind="hardlink", target="bin/tool", mtime=1_600_001_013),
        FileSpec("bin/tool-alias2", kind="hardlink", target="bin/tool", mtime=1_600_001_013),
        FileSpec("link", data=b"a symlink replaced by a file\n", mtime=1_600_001_014),
        FileSpec("cycle", data=b"a file over a dir, no whiteout\n", mtime=1_600_001_015),
    ]
    layer2 = [
        FileSpec("recreate.txt", data=b"second life\n", mtime=1_600_002_001),
        FileSpec("olddir", kind="dir", mtime=1_600_002_002),
        FileSpec("olddir/new", data=b"fresh\n", mtime=1_600_002_003),
        FileSpec("cycle", kind="dir", mtime=1_600_002_003),  # a dir again: starts empty
        FileSpec("cycle/new", data=b"new\n", mtime=1_600_002_003),
        FileSpec("opq", kind="whiteout", mtime=1_600_002_004),  # whiteout + re-creation in one layer
        FileSpec("opq", kind="dir", mode=0o755, mtime=1_600_002_005),
        FileSpec("opq/fresh", data=b"only this\n", mtime=1_600_002_006),
        FileSpec("nothing", kind="whiteout", mtime=1_600_002_007),  # whiteout of nothing: no-op
        FileSpec("bin", kind="dir", mtime=1_600_002_008),
        FileSpec("bin/tool-alias", kind="whiteout", mtime=1_600_002_009),
        FileSpec("bin/extra", data=_data(3, 9_000), xattrs={"trusted.t": b"t", "user.a": b"1"}, mtime=1_600_002_010),
    ]
    data_free = [  # no data blob: directories and whiteouts only
        FileSpec("etc", kind="dir", mode=0o700, mtime=1_600_003_001),
        FileSpec("etc/later.txt", kind="whiteout", mtime=1_600_003_002),
        FileSpec("empty-dir", kind="dir", mode=0o711, mtime=1_600_003_003),
        FileSpec("will-be-dir", kind="dir", mtime=1_600_003_004),
        FileSpec("will-be-dir/child", kind="whiteout", mtime=1_600_003_005),
    ]
    return [base, layer1, layer2, data_free]


def _layer_digest_hex(digest: str) -> str:
    return digest.split(":", 1)[1]


@pytest.fixture(scope="module")
def overlay_oracle(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The layers extracted by GNU tar and rewritten into overlayfs form, top first."""
    work = tmp_path_factory.mktemp("overlay-oracle")
    extracted: list[Path] = []
    for number, files in enumerate(stacked_layers()):
        tar = make_layer_tar(files, work / f"layer{number}.tar")
        root = work / f"layer{number}"
        extract_layer_tar(tar, root)
        to_overlay_form(root, extracted)
        extracted.append(root)
    return list(reversed(extracted))


@pytest.fixture(scope="module", params=["gzip", "zstd"])
def merged_image(  # type: ignore[no-untyped-def]
    request: pytest.FixtureRequest, containerd, registry, image_cache, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, list[Path]]:
    """(compression, merged bootstrap, devices in blob-table order) for a real 4-layer image."""
    compression: str = request.param
    image = image_cache.get(
        ("test_merge_kernel", compression),
        lambda: build_image(containerd, registry, f"merge-kernel/{compression}", stacked_layers(),
                            compression=compression),
    )
    work = tmp_path_factory.mktemp(f"merge-{compression}")
    repeatable = compression == "gzip"  # the snapshotter's flags; zstd covers explicit uid/gid
    bootstraps: list[Path] = []
    devices_by_id: dict[str, Path] = {}
    for layer in image.layers:
        blob_id = _layer_digest_hex(layer.digest)
        blob, toc_path = work / f"{blob_id}.blob", work / f"{blob_id}.toc.json"
        blob.write_bytes(layer.blob())
        toc_path.write_bytes(read_toc_file(blob).raw)
        bootstrap, meta = work / blob_id, work / f"{blob_id}.blob.meta"
        image_cli_ok(
            "create", "--source-type", "stargz_index", "--bootstrap", bootstrap, "--blob-id", blob_id,
            *(["--repeatable"] if repeatable else []), "--disable-check", "--fs-version", "6",
            "--chunk-size", "0x400000", "--blob-meta", meta, "--compressor", compression, toc_path,
        )
        bootstraps.append(bootstrap)
        if meta.exists():
            device = work / f"{blob_id}.img"
            image_cli_ok("materialize", "--blob-meta", meta, "--blob", blob, "-o", device)
            devices_by_id[blob_id] = device
    merged = work / "image.boot"
    image_cli_ok("merge", "--bootstrap", merged, *bootstraps)
    image_cli_ok("check", "--bootstrap", merged)
    blob_ids = blob_ids_of(merged)
    assert blob_ids == [blob_id for blob_id in map(_layer_digest_hex, (l.digest for l in image.layers))
                        if blob_id in devices_by_id]
    return compression, merged, [devices_by_id[blob_id] for blob_id in blob_ids]


def test_merged_image_equals_overlayfs(merged_image: tuple[str, Path, list[Path]], overlay_oracle: list[Path]) -> None:
    compression, merged, devices = merged_image
    compare_owners = compression != "gzip"
    fsck = fsck_erofs(merged, devices)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    with overlay_mounted(overlay_oracle) as view:
        expected = tree_snapshot(view, uid_gid=compare_owners)
    with erofs_mounted(merged, devices) as root:
        actual = tree_snapshot(root, uid_gid=compare_owners)
    expected.pop("/"), actual.pop("/")  # the extraction roots are temp dirs, not layer content
    assert not [path for path in actual if "/.wh." in path]
    assert sorted(actual) == sorted(expected)
    assert actual == expected
    # spot checks that make a wrong oracle conversion visible too
    assert "/olddir/a" not in actual and "/olddir/new" in actual
    assert sorted(p for p in actual if p.startswith("/opq/")) == ["/opq/fresh"]
    assert sorted(p for p in actual if p.startswith("/opq2/")) == ["/opq2/new"]
    assert sorted(p for p in actual if p.startswith("/cycle/")) == ["/cycle/new"]
    assert actual["/etc/hl-b"]["link_group"] is None and actual["/etc/hl-b"]["type"] == "reg"
    assert actual["/will-be-file"]["type"] == "reg" and actual["/will-be-dir"]["type"] == "dir"
    assert actual["/bin/tool-alias2"]["link_group"] == "/bin/tool" and "/bin/tool-alias" not in actual
    assert actual["/etc/keep.txt"]["xattrs"] == [("user.origin", b"base".hex())]
    assert not {"/ghost", "/etc/phantom", "/etc/later.txt", "/will-be-dir/child"} & set(actual)

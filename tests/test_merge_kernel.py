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
from pathlib import Path

import pytest

from stargzfs.estargz.fetch import read_toc_file
from support.erofs import erofs_mounted, fsck_erofs, overlay_mounted, tree_snapshot
from support.paths import NYDUS_FIXTURES
from support.snapshot_root import hex_of, image_cli_ok
from support.stacks import stacked_image, stacked_overlay_lowers

EMPTY_ID = "db30bb2870067ed3e0e73c7448d9f0b529169da8295b5b5155b417624d861d81"
LOWER_ID = "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
UPPER_ID = "5aabe268d8139e952bfff14b2dd0f43fcfef4f2c38b63ea782486ce7268d4954"


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


@pytest.fixture(scope="module")
def overlay_oracle(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The layers extracted by GNU tar and rewritten into overlayfs form, top first."""
    return stacked_overlay_lowers(tmp_path_factory.mktemp("overlay-oracle"))


@pytest.fixture(scope="module", params=["gzip", "zstd"])
def merged_image(  # type: ignore[no-untyped-def]
    request: pytest.FixtureRequest, containerd, registry, image_cache, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, list[Path]]:
    """(compression, merged bootstrap, devices in blob-table order) for a real 4-layer image."""
    compression: str = request.param
    image = stacked_image(image_cache, containerd, registry, compression)
    work = tmp_path_factory.mktemp(f"merge-{compression}")
    repeatable = compression == "gzip"  # the snapshotter's flags; zstd covers explicit uid/gid
    bootstraps: list[Path] = []
    devices_by_id: dict[str, Path] = {}
    for layer in image.layers:
        blob_id = hex_of(layer.digest)
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
    assert blob_ids == [blob_id for blob_id in map(hex_of, (l.digest for l in image.layers))
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

"""`stargzfs-image merge` without the kernel: whiteout semantics, blob table, flags, errors.

Layers are small hand-written TOCs built with the real builder; the merged bootstrap is read
back with the real reader and validated with `check`. The kernel comparisons (erofs vs
overlayfs, nydus's expected results) live in test_merge_kernel.py.
"""

from __future__ import annotations

import hashlib
import json
import stat
import sys
from pathlib import Path

import pytest

from stargzfs import image_cli
from stargzfs.atomicio import OutputError
from stargzfs.errors import FormatError, UnsupportedError, UsageError
from stargzfs.estargz.toc import MAX_NAME_DEPTH, parse_toc
from stargzfs.rafs.build import build_bootstrap
from stargzfs.rafs.check import check_bootstrap
from stargzfs.rafs.merge import merge_bootstraps
from stargzfs.rafs.ondisk import FLAG_EXPLICIT_UID_GID, FLAG_HAS_XATTR
from stargzfs.rafs.reader import BootstrapReader, read_bootstrap
from stargzfs.rafs.tree import Node, RafsImage


def layer_id(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def entry(name: str, kind: str = "reg", **fields: object) -> dict:
    """A TOC record; `data=N` makes a regular file of N bytes (one chunk, fake offset)."""
    record: dict = {"name": name, "type": kind, "mode": fields.pop("mode", 0o755 if kind == "dir" else 0o644)}
    size = fields.pop("data", 0)
    if kind == "reg" and size:
        record["size"] = size
    record.update(fields)
    return record


def write_layer(
    directory: Path, label: str, records: list[dict], *, chunk_size: int = 0x400000, compressor: str = "gzip",
    repeatable: bool = True, name: str | None = None,
) -> Path:
    """Build a bootstrap from TOC records (data offsets assigned in order) named by its layer id."""
    offset = 100
    for record in records:
        if record.get("size"):
            record.setdefault("offset", offset)
            offset += 1000
    toc = parse_toc(json.dumps({"version": 1, "entries": records}).encode())
    result = build_bootstrap(toc, blob_id=layer_id(label), chunk_size=chunk_size, repeatable=repeatable,
                             compressor=compressor)
    path = directory / (name or layer_id(label))
    path.write_bytes(result.bootstrap)
    return path


def paths(image: RafsImage) -> dict[str, Node]:
    return {path.decode(): node for path, node in image.walk()}


def merged(*sources: Path, parent: Path | None = None) -> tuple[bytes, RafsImage]:
    result = merge_bootstraps(list(sources), parent=parent)
    report = check_bootstrap(result.bootstrap)
    assert report.ok, report.errors
    return result.bootstrap, read_bootstrap(result.bootstrap)


def test_whiteouts_opaque_dirs_and_replacements(tmp_path: Path) -> None:
    base = write_layer(tmp_path, "base", [
        entry("", "dir", mode=0o700),
        entry("a", "dir"), entry("a/keep", data=5), entry("a/gone", data=5), entry("a/.wh.phantom"),
        entry(".wh.ghost"),
        entry("d", "dir"), entry("d/sub", "dir"), entry("d/sub/deep", data=3),
        entry("opq", "dir"), entry("opq/old", data=3),
        entry("f2d", data=4), entry("d2f", "dir"), entry("d2f/inner", data=4),
        entry("again", data=2), entry("sym", "symlink", linkName="a/keep", mode=0o777),
        entry("cycle", "dir"), entry("cycle/old", data=1),
    ])
    upper = write_layer(tmp_path, "upper", [
        entry("", "dir", mode=0o751),
        entry("a", "dir", mode=0o700), entry("a/.wh.gone"),
        entry(".wh.d"), entry(".wh.again"), entry(".wh.nothing"), entry(".wh..wh.plnk"),
        entry("opq", "dir"), entry("opq/new", data=3), entry("opq/.wh..wh..opq"),  # marker after a sibling
        entry("f2d", "dir"), entry("f2d/child", data=1),
        entry("d2f", data=6),
        entry("cycle", data=2),  # a file over a dir, no whiteout
    ])
    top = write_layer(tmp_path, "top", [
        entry("again", data=7),  # re-created after deletion
        entry("d", "dir"), entry("d/fresh", data=1),  # must not bring back d/sub
        entry(".wh.d2f"), entry("d2f", "dir"),  # whiteout + re-creation in one layer
        entry("cycle", "dir"), entry("cycle/new", data=1),  # a dir again: cycle/old stays buried
    ])
    _, image = merged(base, upper, top)
    tree = paths(image)
    assert sorted(tree) == [
        "/", "/a", "/a/keep", "/again", "/cycle", "/cycle/new", "/d", "/d/fresh", "/d2f", "/f2d", "/f2d/child", "/opq", "/opq/new", "/sym",
    ]
    assert stat.S_IMODE(tree["/"].mode) == 0o755  # the topmost root wins; "top" has none, so the builder's 0755
    assert tree["/again"].size == 7 and tree["/d2f"].children == {}
    assert stat.S_IMODE(tree["/a"].mode) == 0o700 and tree["/sym"].symlink == b"a/keep"


def test_topmost_root_attributes_win(tmp_path: Path) -> None:
    lower = write_layer(tmp_path, "lower", [entry("", "dir", mode=0o700, uid=5), entry("x", data=1)])
    upper = write_layer(tmp_path, "upper", [entry("", "dir", mode=0o711), entry("y", data=1)])
    _, image = merged(lower, upper)
    assert stat.S_IMODE(image.root.mode) == 0o711 and sorted(image.root.children or {}) == [b"x", b"y"]


def test_blob_table_is_first_seen_order_and_chunks_follow_their_layer(tmp_path: Path) -> None:
    empty = write_layer(tmp_path, "empty", [entry("", "dir"), entry("empty-file")])
    first = write_layer(tmp_path, "first", [entry("one", data=10), entry("shared", data=10)])
    dirs_only = write_layer(tmp_path, "dirs", [entry("etc", "dir"), entry(".wh.nothing")])
    second = write_layer(tmp_path, "second", [entry("two", data=20), entry("shared", data=30)])
    data, image = merged(empty, first, dirs_only, second, first)  # `first` again: no new blob
    assert [blob.blob_id for blob in image.blobs] == [layer_id("first"), layer_id("second")]
    tree = paths(image)
    assert [c.blob_index for c in tree["/one"].chunks] == [0]
    assert [c.blob_index for c in tree["/two"].chunks] == [1]
    assert tree["/shared"].size == 10 and [c.blob_index for c in tree["/shared"].chunks] == [0]
    assert sorted(tree) == ["/", "/empty-file", "/etc", "/one", "/shared", "/two"]
    slots = BootstrapReader(data).device_slots()
    assert [slot.tag.decode() if isinstance(slot.tag, bytes) else slot.tag for slot in slots] == [
        layer_id("first"), layer_id("second")]


def test_blob_id_comes_from_the_file_name(tmp_path: Path) -> None:
    renamed = write_layer(tmp_path, "built-as", [entry("f", data=3)], name=layer_id("named-as"))
    _, image = merged(renamed)
    assert [blob.blob_id for blob in image.blobs] == [layer_id("named-as")]


def test_single_source_applies_its_own_whiteouts(tmp_path: Path) -> None:
    only = write_layer(tmp_path, "only", [entry("x", data=4), entry(".wh.x"), entry("d", "dir"),
                                          entry("d/.wh..wh..opq"), entry("d/y", data=1)])
    data, image = merged(only)
    assert sorted(paths(image)) == ["/", "/d", "/d/y", "/x"]  # a layer's whiteouts hide only lower layers
    assert BootstrapReader(data).ext.flags & FLAG_HAS_XATTR


def test_empty_layers_and_tocs_without_root(tmp_path: Path) -> None:
    nothing = write_layer(tmp_path, "nothing", [])
    rootless = write_layer(tmp_path, "rootless", [entry("a/b/c")])  # implicit parents, no root entry
    data, image = merged(nothing, nothing, rootless)
    assert image.blobs == [] and sorted(paths(image)) == ["/", "/a", "/a/b", "/a/b/c"]
    assert stat.S_IMODE(image.root.mode) == 0o755
    _, alone = merged(nothing)
    assert alone.root.children == {} and alone.blobs == []
    assert BootstrapReader(data).sb.extra_devices == 0


def test_hardlinks_stay_per_layer_inodes(tmp_path: Path) -> None:
    lower = write_layer(tmp_path, "lower", [entry("a", data=5), entry("b", "hardlink", linkName="a"),
                                            entry("c", "hardlink", linkName="a")])
    upper = write_layer(tmp_path, "upper", [entry(".wh.a"), entry("x", data=6), entry("y", "hardlink", linkName="x")])
    data, image = merged(lower, upper)
    tree = paths(image)
    assert tree["/b"].link is not None and tree["/b"].link is tree["/c"].link
    assert tree["/x"].link is not None and tree["/x"].link is tree["/y"].link
    assert tree["/b"].link is not tree["/x"].link and "/a" not in tree
    reader = BootstrapReader(data)
    root_entries = {name: nid for name, nid, _ in reader.dirents(reader.sb.root_nid, reader.inode(reader.sb.root_nid))}
    assert reader.inode(root_entries[b"b"]).nlink == 2  # a was removed: b and c are what is left
    assert reader.inode(root_entries[b"x"]).nlink == 2


def test_flags_are_inherited_and_has_xattr_is_always_set(tmp_path: Path) -> None:
    lower = write_layer(tmp_path, "lower", [entry("f", data=1, uid=1000)], compressor="zstd", repeatable=False)
    upper = write_layer(tmp_path, "upper", [entry("g", data=1, uid=2000)], compressor="zstd", repeatable=False)
    data, image = merged(lower, upper)
    flags = BootstrapReader(data).ext.flags
    assert flags & FLAG_HAS_XATTR and flags & FLAG_EXPLICIT_UID_GID
    assert image.compressor == "zstd" and paths(image)["/g"].uid == 2000
    assert BootstrapReader(data).sb.root_nid == 128


def test_parent_bootstrap_is_the_bottom_of_the_stack(tmp_path: Path) -> None:
    one = write_layer(tmp_path, "one", [entry("a", data=1), entry("b", data=1)])
    two = write_layer(tmp_path, "two", [entry(".wh.a"), entry("c", data=1)])
    three = write_layer(tmp_path, "three", [entry(".wh.b"), entry("d", data=1)])
    parent = tmp_path / "parent.boot"
    parent.write_bytes(merge_bootstraps([one, two]).bootstrap)
    _, stacked = merged(three, parent=parent)
    _, direct = merged(one, two, three)
    assert sorted(paths(stacked)) == sorted(paths(direct)) == ["/", "/c", "/d"]
    assert [b.blob_id for b in stacked.blobs] == [b.blob_id for b in direct.blobs]
    assert [c.blob_index for c in paths(stacked)["/d"].chunks] == [2]


def test_deep_directories_do_not_hit_the_recursion_limit(tmp_path: Path) -> None:
    deep = "/".join(["d"] * (MAX_NAME_DEPTH - 1))  # the leaves are as deep as a TOC name may be
    assert MAX_NAME_DEPTH > sys.getrecursionlimit()
    lower = write_layer(tmp_path, "lower", [entry(deep, "dir"), entry(deep + "/leaf", data=1)])
    upper = write_layer(tmp_path, "upper", [entry(deep, "dir"), entry(deep + "/.wh.leaf"), entry(deep + "/new")])
    _, image = merged(lower, upper)
    node = image.lookup(deep)
    assert node is not None and sorted(node.children or {}) == [b"new"]


# ---------------------------------------------------------------------------------------------
# errors: one clear line, distinct exit codes, no OUT (and an existing OUT left alone)


def run_cli(*argv: str | Path) -> int:
    return image_cli.main([str(arg) for arg in argv])


def assert_fails_cleanly(
    capsys: pytest.CaptureFixture[str], out: Path, argv: list[str | Path], code: int, *needles: str
) -> None:
    out.write_bytes(b"previous image.boot")
    assert run_cli("merge", "--bootstrap", out, *argv) == code
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("stargzfs-image merge: ")
    for needle in needles:
        assert needle in message, message
    assert out.read_bytes() == b"previous image.boot"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp left behind


def test_cli_writes_out_and_output_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lower = write_layer(tmp_path, "lower", [entry("f", data=3)])
    upper = write_layer(tmp_path, "upper", [entry(".wh.f")])
    out, report = tmp_path / "out" / "image.boot", tmp_path / "out" / "merge.json"
    out.parent.mkdir()
    assert run_cli("merge", "--bootstrap", out, "--output-json", report, lower, upper) == 0
    assert check_bootstrap(out.read_bytes()).ok
    assert sorted(paths(read_bootstrap(out.read_bytes()))) == ["/"]
    assert json.loads(report.read_text()) == {"blobs": [layer_id("lower")]}
    assert sorted(p.name for p in out.parent.iterdir()) == ["image.boot", "merge.json"]


def test_cli_rejects_names_that_are_not_layer_digests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_layer(tmp_path, "good", [entry("f", data=3)])
    bad = tmp_path / "layer.boot"
    bad.write_bytes(good.read_bytes())
    upper_hex = tmp_path / layer_id("x").upper()
    upper_hex.write_bytes(good.read_bytes())
    out = tmp_path / "out.boot"
    assert_fails_cleanly(capsys, out, [good, bad], UsageError.exit_code, "layer.boot", "64 lowercase hex")
    assert_fails_cleanly(capsys, out, [upper_hex], UsageError.exit_code, "64 lowercase hex")


def test_cli_rejects_unreadable_and_corrupt_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_layer(tmp_path, "good", [entry("f", data=3)])
    out = tmp_path / "out.boot"
    missing = tmp_path / layer_id("missing")
    assert_fails_cleanly(capsys, out, [good, missing], UsageError.exit_code, "cannot read", layer_id("missing"))
    garbage = tmp_path / layer_id("garbage")
    garbage.write_bytes(b"\x17" * 8192)
    assert_fails_cleanly(capsys, out, [good, garbage], FormatError.exit_code, "corrupt", layer_id("garbage"))
    truncated = tmp_path / layer_id("truncated")
    truncated.write_bytes(good.read_bytes()[:4096 + 1024])
    assert_fails_cleanly(capsys, out, [truncated], FormatError.exit_code, "corrupt")
    v5 = tmp_path / layer_id("v5")
    v5.write_bytes(b"SFAR" + (0x500).to_bytes(4, "little") + bytes(8184))
    assert_fails_cleanly(capsys, out, [good, v5], UnsupportedError.exit_code, "RAFS v5", "fs version")


def test_cli_rejects_mismatched_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gzip_layer = write_layer(tmp_path, "gzip", [entry("f", data=3)])
    zstd_layer = write_layer(tmp_path, "zstd", [entry("g", data=3)], compressor="zstd")
    small_chunks = write_layer(tmp_path, "small", [entry("h", data=3)], chunk_size=0x100000)
    owners = write_layer(tmp_path, "owners", [entry("i", data=3)], repeatable=False)
    out = tmp_path / "out.boot"
    assert_fails_cleanly(capsys, out, [gzip_layer, zstd_layer], UnsupportedError.exit_code, "compressor", "zstd")
    assert_fails_cleanly(capsys, out, [gzip_layer, small_chunks], UnsupportedError.exit_code, "chunk size", "0x100000")
    assert_fails_cleanly(capsys, out, [gzip_layer, owners], UnsupportedError.exit_code, "uid/gid")
    already_merged = tmp_path / layer_id("merged")
    already_merged.write_bytes(merge_bootstraps([gzip_layer, write_layer(tmp_path, "b", [entry("j", data=1)])]).bootstrap)
    assert_fails_cleanly(capsys, out, [already_merged], UnsupportedError.exit_code, "2 blobs", "--parent-bootstrap")


def test_layers_without_data_never_conflict_on_compressor_or_chunk_size(tmp_path: Path) -> None:
    dirs_only = write_layer(tmp_path, "dirs", [entry("etc", "dir")], chunk_size=0x100000)
    zstd_layer = write_layer(tmp_path, "zstd", [entry("g", data=3)], compressor="zstd")
    _, image = merged(dirs_only, zstd_layer)
    assert image.compressor == "zstd" and image.chunk_size == 0x400000


def test_cli_output_directory_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer = write_layer(tmp_path, "layer", [entry("f", data=3)])
    assert run_cli("merge", "--bootstrap", tmp_path / "missing" / "image.boot", layer) == OutputError.exit_code == 1
    message = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'missing' / 'image.boot'}: No such file or directory" in message
    assert message.count("\n") == 1
    assert not (tmp_path / "missing").exists()


def test_cli_accepts_only_nydus_defaults_for_prefetch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer = write_layer(tmp_path, "layer", [entry("f", data=3)])
    with pytest.raises(SystemExit) as exited:
        run_cli("merge", "--bootstrap", tmp_path / "out", "--prefetch-policy", "fs", layer)
    assert exited.value.code == UsageError.exit_code and "invalid choice" in capsys.readouterr().err
    assert run_cli("merge", "--bootstrap", tmp_path / "out", "--prefetch-policy", "none", layer) == 0
    assert check_bootstrap((tmp_path / "out").read_bytes()).ok


def test_a_block_id_in_two_blobs_keeps_a_chunk_table_record_per_blob() -> None:
    """Builders that hash content give two layers' equal chunks one block id: the chunk table
    keys records by (block id, blob), sorted so, and both records must stay."""
    import stat as stat_module

    from stargzfs.rafs.reader import BootstrapReader, read_bootstrap
    from stargzfs.rafs.tree import BlobInfo, ChunkRef, Node, RafsImage
    from stargzfs.rafs.writer import write_bootstrap

    shared, other = b"\x22" * 32, b"\x11" * 32
    root = Node.directory(b"", stat_module.S_IFDIR | 0o755)
    specs = [(b"a", ChunkRef(0, 0, 0, 100, 10, 0, 0, shared)), (b"b", ChunkRef(1, 0, 0, 100, 10, 0, 0, shared)),
             (b"c", ChunkRef(1, 1, 4096, 50, 200, 0, 0, other))]
    for name, ref in specs:
        root.children[name] = Node(name, stat_module.S_IFREG | 0o644, size=ref.uncompressed_size, chunks=[ref])
    blobs = [BlobInfo("a" * 64, 1, 0x400000), BlobInfo("b" * 64, 2, 0x400000)]
    data = bytes(write_bootstrap(RafsImage(root=root, blobs=blobs)))
    records = BootstrapReader(data).chunk_records()
    assert [(r.block_id, r.blob_index) for r in records] == [(other, 1), (shared, 0), (shared, 1)]
    files = read_bootstrap(data).root.children
    assert [(files[n].chunks[0].blob_index, files[n].chunks[0].block_id) for n in (b"a", b"b", b"c")] == [
        (0, shared), (1, shared), (1, other)]


def test_refs_shared_within_a_blob_give_one_chunk_table_record() -> None:
    """Hardlinks (and a source's chunk-table record used by several files) put one block id
    under several paths of one blob: the table holds it once, and with two equal-id refs
    that differ (a hand-made tree) the last one placed is the record, as always."""
    import stat as stat_module

    from stargzfs.rafs.reader import BootstrapReader
    from stargzfs.rafs.tree import BlobInfo, ChunkRef, LinkGroup, Node, RafsImage
    from stargzfs.rafs.writer import write_bootstrap

    one, two, three = b"\x33" * 32, b"\x44" * 32, b"\x05" * 32
    root = Node.directory(b"", stat_module.S_IFDIR | 0o755)
    shared = [ChunkRef(1, 0, 0, 100, 10, 0, 0, one)]
    group = LinkGroup()
    for name in (b"h1", b"h2"):  # one inode, two paths: the same list of refs
        root.children[name] = Node(name, stat_module.S_IFREG | 0o644, size=100, chunks=shared, link=group)
    root.children[b"x"] = Node(b"x", stat_module.S_IFREG | 0o644, size=50,
                               chunks=[ChunkRef(0, 0, 0, 50, 10, 0, 0, three)])
    # equal block id, same blob, different fields: "y" is placed after "w"
    root.children[b"w"] = Node(b"w", stat_module.S_IFREG | 0o644, size=60,
                               chunks=[ChunkRef(1, 1, 4096, 60, 300, 0, 0, two)])
    root.children[b"y"] = Node(b"y", stat_module.S_IFREG | 0o644, size=60,
                               chunks=[ChunkRef(1, 1, 4096, 60, 400, 0, 0, two)])
    blobs = [BlobInfo("a" * 64, 1, 0x400000), BlobInfo("b" * 64, 2, 0x400000)]
    records = BootstrapReader(bytes(write_bootstrap(RafsImage(root=root, blobs=blobs)))).chunk_records()
    assert [(r.block_id, r.blob_index, r.compressed_offset) for r in records] == [
        (three, 0, 10), (one, 1, 10), (two, 1, 400)]

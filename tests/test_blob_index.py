"""The lazy-serving blob index: `create --blob-index` (one parse, during the conversion) makes
exactly what `blob-index` makes afterwards, and the index says what the TOC says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stargzfs.rafs import blobindex
from stargzfs.rafs.blobmeta import decode_blob_meta
from support.crafted import crafted_layer, sha256
from support.paths import NYDUS_FIXTURES
from support.snapshot_root import image_cli, image_cli_ok

BLOB_ID = "cd" * 32


def _create(toc: Path, out: Path, *extra: str) -> tuple[Path, Path, Path]:
    boot, meta, index = out / "boot", out / "meta", out / "index"
    image_cli_ok(
        "create", "--source-type", "stargz_index", "--bootstrap", boot, "--blob-id", BLOB_ID, "--repeatable",
        "--fs-version", "6", "--blob-meta", meta, "--blob-index", index, *extra, toc,
    )
    return boot, meta, index


def _landmark_layer(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    files = {
        "early.bin": os.urandom(5000),
        ".prefetch.landmark": b"\0",
        "late.bin": os.urandom(7000),
        "empty": b"",
    }
    _, toc_json = crafted_layer(files)
    toc = tmp_path / "stargz.index.json"
    toc.write_bytes(toc_json)
    return toc, files


@pytest.mark.parametrize("name", ["lower", "upper"])
def test_create_writes_the_index_blob_index_writes(name: str, tmp_path: Path) -> None:
    toc = NYDUS_FIXTURES / f"stargz.index-{name}.json"
    _, meta, index = _create(toc, tmp_path)
    separate = tmp_path / "separate"
    image_cli_ok("blob-index", "--toc", toc, "--blob-meta", meta, "-o", separate)
    assert index.read_bytes() == separate.read_bytes()
    decoded = blobindex.decode(index.read_bytes(), meta.read_bytes())
    assert decoded.chunk_count == len(decode_blob_meta(meta.read_bytes())[1]) > 0


def test_the_index_holds_each_chunks_digest_and_the_files_before_the_landmark(tmp_path: Path) -> None:
    toc, files = _landmark_layer(tmp_path)
    _, meta, index = _create(toc, tmp_path)
    decoded = blobindex.decode(index.read_bytes(), meta.read_bytes())
    # blob.meta lists the files' chunks in blob order (the hidden landmark is no file)
    expected = [files["early.bin"], files["late.bin"]]
    assert [d.hex() if d else None for d in decoded.digests] == [sha256(data)[7:] for data in expected]
    assert [decoded.in_prefetch(i) for i in range(2)] == [True, False]
    assert decoded.flags == blobindex.FLAG_PREFETCH_LANDMARK


def test_no_index_without_data_and_an_index_for_another_blob_meta_is_refused(tmp_path: Path) -> None:
    _, toc_json = crafted_layer({"empty": b""})
    toc = tmp_path / "toc.json"
    toc.write_bytes(toc_json)
    _, meta, index = _create(toc, tmp_path)
    assert not meta.exists() and not index.exists()

    other = tmp_path / "other"
    other.mkdir()
    landmark_toc, _ = _landmark_layer(other)
    _, other_meta, other_index = _create(landmark_toc, other)
    lower_meta = _create(NYDUS_FIXTURES / "stargz.index-lower.json", tmp_path)[1]
    with pytest.raises(Exception, match="another blob.meta"):
        blobindex.decode(other_index.read_bytes(), lower_meta.read_bytes())
    assert blobindex.decode(other_index.read_bytes(), other_meta.read_bytes()).chunk_count == 2


def test_a_toc_lazy_serving_cannot_use_still_gets_its_bootstrap(tmp_path: Path) -> None:
    """A digest that is not sha256 fails only the index (and so lazy serving), with a warning
    naming it, as it did when the index was made later."""
    data = os.urandom(3000)
    _, toc_json = crafted_layer({"a": data})
    toc = tmp_path / "toc.json"
    toc.write_bytes(toc_json.replace(sha256(data).encode(), b"md5:abc"))
    done = image_cli(
        "create", "--source-type", "stargz_index", "--bootstrap", tmp_path / "boot", "--blob-id", BLOB_ID,
        "--blob-meta", tmp_path / "meta", "--blob-index", tmp_path / "index", toc,
    )
    assert done.returncode == 0 and "no blob index written" in done.stderr and "md5:abc" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boot", "meta", "toc.json"]


def test_blob_index_without_blob_meta_is_a_usage_error(tmp_path: Path) -> None:
    done = image_cli(
        "create", "--source-type", "stargz_index", "--bootstrap", tmp_path / "boot", "--blob-id", BLOB_ID,
        "--blob-index", tmp_path / "index", NYDUS_FIXTURES / "stargz.index-lower.json",
    )
    assert done.returncode == 2 and "--blob-index needs --blob-meta" in done.stderr
    assert list(tmp_path.iterdir()) == []

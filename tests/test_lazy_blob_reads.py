"""LazyBlob over a real blob file, the real builder's blob.meta and index, and a real cache dir:
the order in which a read's chunk and the readahead behind it are fetched, committed and answered."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from stargzfs.estargz.fetch import FileRangeReader
from stargzfs.lazyblobs.cache import BlobCache
from stargzfs.lazyblobs.server import LazyBlob
from stargzfs.rafs import blobindex, chunks as chunk_plan
from stargzfs.rafs.blobmeta import decode_blob_meta
from support.crafted import crafted_layer
from support.snapshot_root import image_cli_ok

BLOB_ID = "cd" * 32


async def test_a_read_goes_on_once_its_chunk_is_committed_not_after_the_readahead_behind_it(tmp_path: Path) -> None:
    small, big = os.urandom(3000), os.urandom(600_000)  # incompressible: the readahead is ~600 KB
    blob_bytes, toc_json = crafted_layer({"a": small, "b": big})
    (tmp_path / "blob").write_bytes(blob_bytes)
    (tmp_path / "toc.json").write_bytes(toc_json)
    meta, index = tmp_path / "meta", tmp_path / "index"
    image_cli_ok(
        "create", "--source-type", "stargz_index", "--bootstrap", tmp_path / "boot", "--blob-id", BLOB_ID,
        "--repeatable", "--blob-meta", meta, "--blob-index", index, tmp_path / "toc.json",
    )
    _, entries = decode_blob_meta(meta.read_bytes())
    (tmp_path / "cache").mkdir()
    cache_fd = os.open(tmp_path / "cache", os.O_PATH | os.O_DIRECTORY)
    cache = BlobCache(cache_fd, BLOB_ID, chunk_count=len(entries), size=chunk_plan.cache_size(entries))
    reader = FileRangeReader(tmp_path / "blob")

    async def open_reader() -> FileRangeReader:
        return reader

    try:
        async with trio.open_nursery() as nursery:
            blob = LazyBlob(
                BLOB_ID, entries, blobindex.decode(index.read_bytes(), meta.read_bytes()), cache, open_reader,
                fetch_slots=trio.CapacityLimiter(4), spawn=nursery.start_soon,
            )
            first, second = entries
            assert await blob.read(first.uncompressed_offset, len(small)) == small
            assert cache.has(0)  # a read returns only once its chunk is committed
            assert blob.stats.early_answers == 1  # ... and before the 600 KB behind it was decoded
            assert await blob.read(second.uncompressed_offset, len(big)) == big  # joins the same fetch
            assert reader.requests == 1 and cache.has(1) and cache.present_count == 2
            assert blob.stats.chunks_fetched == 2
    finally:
        cache.close()
        os.close(cache_fd)

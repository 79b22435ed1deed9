"""LazyBlob over a real blob file, the real builder's blob.meta and index, and a real cache dir:
the order in which a read's chunk and the readahead behind it are fetched, committed and answered."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from stargzfs.estargz.fetch import FileRangeReader
from stargzfs.lazyblobs.cache import BlobCache
from stargzfs.lazyblobs.server import FetchPolicy, LazyBlob
from stargzfs.rafs import blobindex, chunks as chunk_plan
from stargzfs.rafs.blobmeta import decode_blob_meta
from support.crafted import crafted_layer, sha256
from support.snapshot_root import image_cli_ok

BLOB_ID = "cd" * 32


def _blob(tmp_path: Path, files: dict[str, bytes], lie_about: bytes | None = None) -> tuple[Path, Path, Path]:
    """A crafted layer's blob file, and the real builder's blob.meta and index for it (with
    `lie_about`, the TOC gives that file's chunk another digest)."""
    blob_bytes, toc_json = crafted_layer(files)
    if lie_about is not None:
        toc_json = toc_json.replace(sha256(lie_about).encode(), sha256(b"something else").encode())
    (tmp_path / "blob").write_bytes(blob_bytes)
    (tmp_path / "toc.json").write_bytes(toc_json)
    meta, index = tmp_path / "meta", tmp_path / "index"
    image_cli_ok(
        "create", "--source-type", "stargz_index", "--bootstrap", tmp_path / "boot", "--blob-id", BLOB_ID,
        "--repeatable", "--blob-meta", meta, "--blob-index", index, tmp_path / "toc.json",
    )
    return tmp_path / "blob", meta, index


@asynccontextmanager
async def _lazy_blob(
    tmp_path: Path, files: dict[str, bytes], policy: FetchPolicy, lie_about: bytes | None = None,
) -> AsyncIterator[tuple[LazyBlob, FileRangeReader, BlobCache, list]]:
    blob_path, meta, index = _blob(tmp_path, files, lie_about)
    _, entries = decode_blob_meta(meta.read_bytes())
    (tmp_path / "cache").mkdir()
    cache_fd = os.open(tmp_path / "cache", os.O_PATH | os.O_DIRECTORY)
    cache = BlobCache(cache_fd, BLOB_ID, chunk_count=len(entries), size=chunk_plan.cache_size(entries))
    reader = FileRangeReader(blob_path)

    async def open_reader() -> FileRangeReader:
        return reader

    try:
        async with trio.open_nursery() as nursery:
            yield LazyBlob(
                BLOB_ID, entries, blobindex.decode(index.read_bytes(), meta.read_bytes()), cache, open_reader,
                fetch_slots=trio.CapacityLimiter(4), spawn=nursery.start_soon, policy=policy,
            ), reader, cache, entries
    finally:
        cache.close()
        os.close(cache_fd)


async def test_a_read_goes_on_once_its_chunk_is_committed_not_after_the_readahead_behind_it(tmp_path: Path) -> None:
    small, big = os.urandom(3000), os.urandom(600_000)  # incompressible: the readahead is ~600 KB
    # a readahead budget the big neighbour fits in (as a sequential scan's grown window is)
    async with _lazy_blob(tmp_path, {"a": small, "b": big}, FetchPolicy(readahead_min=1 << 20)) as (
            blob, reader, cache, entries):
        first, second = entries
        assert await blob.read(first.uncompressed_offset, len(small)) == small
        assert cache.has(0)  # a read returns only once its chunk is committed
        assert blob.stats.early_answers == 1  # ... and before the 600 KB behind it was decoded
        assert await blob.read(second.uncompressed_offset, len(big)) == big  # joins the same fetch
        assert reader.requests == 1 and cache.has(1) and cache.present_count == 2
        assert blob.stats.chunks_fetched == 2


async def test_a_first_read_leaves_a_neighbour_larger_than_the_readahead_alone(tmp_path: Path) -> None:
    small, tiny, big = os.urandom(3000), os.urandom(2000), os.urandom(600_000)
    async with _lazy_blob(tmp_path, {"a": small, "b": tiny, "c": big}, FetchPolicy()) as (
            blob, reader, cache, entries):
        assert await blob.read(entries[0].uncompressed_offset, len(small)) == small
        # the small neighbour came along (it fits the 128 KiB readahead), the big one did not
        assert reader.requests == 1 and reader.bytes_read < 20_000
        assert cache.has(0) and not cache.has(2)
        await blob.ensure(blob.chunks_for(entries[1].uncompressed_offset, 1))  # in flight or there
        assert cache.has(1) and reader.requests == 1
        assert await blob.read(entries[2].uncompressed_offset, len(big)) == big
        assert reader.requests == 2 and cache.present_count == 3


async def test_a_chunk_answered_early_stays_good_when_one_behind_it_fails_verification(tmp_path: Path) -> None:
    small, big = os.urandom(3000), os.urandom(600_000)
    async with _lazy_blob(tmp_path, {"a": small, "b": big}, FetchPolicy(readahead_min=1 << 20), lie_about=big) as (
            blob, reader, cache, entries):
        assert await blob.read(entries[0].uncompressed_offset, len(small)) == small
        assert blob.stats.early_answers == 1
        with pytest.raises(OSError) as failed:  # the same fetch's second chunk does not verify
            await blob.read(entries[1].uncompressed_offset, 100)  # (joined it, or fetched again)
        assert failed.value.errno == errno.EIO and "the TOC says" in str(failed.value)
        assert cache.has(0) and not cache.has(1) and reader.requests in (1, 2)
        requests = reader.requests
        with pytest.raises(OSError):  # tried again by the next read, never served unverified
            await blob.read(entries[1].uncompressed_offset, 100)
        assert reader.requests == requests + 1 and not cache.has(1) and cache.has(0)

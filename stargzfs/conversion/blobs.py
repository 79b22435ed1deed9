"""MNT/.blobs/<hex>: every converted layer's blob as a file the kernel's erofs can use as `device=`.

Which blobs exist and where their inputs are is this mount's knowledge (a candidate
snapshot with a bootstrap for the digest gives the TOC, the blob.meta and the registry to
fetch from); how bytes are fetched, checked and cached is stargzfs.lazyblobs'. The TOC is
untrusted, so what serving needs from it (chunk digests, the prefetch set) is extracted once
per blob by `stargzfs-image blob-index` in a capped subprocess and kept beside the cache.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio

from stargzfs.conversion.builder import Builder, run_builder
from stargzfs.conversion.rootdirs import RootDirs
from stargzfs.conversion.state import StateRecorder
from stargzfs.conversion.table import LiveTable
from stargzfs.errors import StargzfsError
from stargzfs.fdpath import is_regular_at, lstat_at, proc_path, unlink_quietly
from stargzfs.lazyblobs.cache import BlobCache
from stargzfs.lazyblobs.server import FetchPolicy, LazyBlob
from stargzfs.rafs import blobindex, chunks as chunk_plan
from stargzfs.rafs.blobmeta import decode_blob_meta, uncompressed_extent
from stargzfs.registry import CredentialCache, Credentials, RegistryClient, parse_reference
from stargzfs.snapshots import layout
from stargzfs.snapshots.store import LayerCandidate

log = logging.getLogger(__name__)

LAZY_DIR = ".blobs"  # a snapshot id never starts with a dot
_RECORD_INTERVAL = 2.0  # seconds between state.json records of one blob's fetch figures


@dataclass(frozen=True)
class BlobSettings:
    prefetch: bool = True  # files before .prefetch.landmark, when a blob is first opened
    background_fetch: bool = False  # then everything else, yielding to reads
    fetch_concurrency: int = 8  # ranged GETs in flight for the whole mount


class BlobService:
    """The lazy files of MNT/.blobs/, opened on demand and kept for the mount's lifetime."""

    def __init__(
        self,
        *,
        dirs: RootDirs,
        table: LiveTable,
        recorder: StateRecorder,
        indexer: Builder,
        registry: Callable[[], Awaitable[RegistryClient]],
        credentials: CredentialCache,
        settings: BlobSettings,
    ) -> None:
        self.dirs = dirs
        self.table = table
        self.recorder = recorder
        self.indexer = indexer  # the bundled builder, under the mount's limits
        self.registry = registry
        self.credentials = credentials
        self.settings = settings
        self._sizes: dict[str, int | None] = {}  # hex -> bytes of its lazy file (None: no data)
        self._sources: dict[str, str] = {}  # hex -> snapshot id whose fs dir has its bootstrap
        self._scanned_txid = -1
        self._blobs: dict[str, LazyBlob] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._slots = trio.CapacityLimiter(settings.fetch_concurrency)
        self._nursery: trio.Nursery | None = None
        self._recorded: dict[str, float] = {}

    def bind_nursery(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is None:
            raise OSError(errno.EIO, "the mount is not serving yet")
        self._nursery.start_soon(fn, *args)

    # ------------------------------------------------------------------ which blobs exist
    def note(self, candidate: LayerCandidate) -> None:
        """A bootstrap for the candidate's layer now exists (converted, copied or found)."""
        self._sources.setdefault(candidate.layer_hex, candidate.snapshot_id)

    def files(self) -> Mapping[str, int]:
        """hex -> size of every blob with a bootstrap in some candidate snapshot."""
        table = self.table.cached()
        if table.txid != self._scanned_txid:
            self._scanned_txid = table.txid
            self._sources = {h: sid for h, sid in self._sources.items() if table.by_id(sid) is not None}
            self._sizes = {h: size for h, size in self._sizes.items() if size is not None}  # looked at again
            for snapshot in table.all():
                candidate = snapshot.candidate
                if candidate is not None and candidate.layer_hex not in self._sources:
                    if self._has_bootstrap(candidate):
                        self.note(candidate)
        for layer_hex in list(self._sources):
            if layer_hex not in self._sizes:
                # a layer with a bootstrap but no blob.meta has no data (blob.meta is published
                # before the bootstrap): remembered until the snapshot table changes, not read
                # again on every lookup
                self._sizes[layer_hex] = self._size(layer_hex)
        return {
            layer_hex: size for layer_hex, size in self._sizes.items() if size is not None and layer_hex in self._sources
        }

    def _has_bootstrap(self, candidate: LayerCandidate) -> bool:
        try:
            fs_fd = self.dirs.open_fs(candidate.snapshot_id)
        except OSError:
            return False
        try:
            return is_regular_at(fs_fd, layout.bootstrap_name(candidate.layer_hex))
        finally:
            os.close(fs_fd)

    def _read_blob_meta(self, layer_hex: str) -> bytes | None:
        """The blob.meta the bootstrap of `layer_hex` came with (cache dir, or fs dir with fscache)."""
        source = self._sources.get(layer_hex)
        if source is None:
            return None
        try:
            fs_fd = self.dirs.open_fs(source)
        except OSError:
            return None
        try:
            return _read_file(self.dirs.blob_meta_dir(fs_fd), layout.blob_meta_name(layer_hex))
        finally:
            os.close(fs_fd)

    def _size(self, layer_hex: str) -> int | None:
        """A layer without data (no blob.meta) has no blob to serve."""
        data = self._read_blob_meta(layer_hex)
        if data is None:
            return None
        try:
            entries, end = uncompressed_extent(data)
        except StargzfsError as exc:
            log.error("blob %s: %s", layer_hex[:12], exc)
            return None
        return (end + chunk_plan.PAGE_SIZE - 1) // chunk_plan.PAGE_SIZE * chunk_plan.PAGE_SIZE if entries else None

    # ------------------------------------------------------------------ serving
    async def open(self, layer_hex: str) -> None:
        await self._blob(layer_hex)

    async def read(self, layer_hex: str, offset: int, size: int) -> bytes:
        blob = await self._blob(layer_hex)
        try:
            return await blob.read(offset, size)
        finally:
            await self._record(layer_hex, blob)

    async def _blob(self, layer_hex: str) -> LazyBlob:
        blob = self._blobs.get(layer_hex)
        if blob is not None:
            return blob
        lock = self._opening.setdefault(layer_hex, trio.Lock())
        async with lock:
            blob = self._blobs.get(layer_hex)
            if blob is None:
                try:
                    blob = await self._load(layer_hex)
                except StargzfsError as exc:
                    message = f"blob {layer_hex[:12]}: {exc}"
                    log.error("%s", message)
                    raise OSError(errno.EIO, message) from None
                self._blobs[layer_hex] = blob
                self._start_background(blob)
        return blob

    async def _load(self, layer_hex: str) -> LazyBlob:
        source = self._sources.get(layer_hex)
        table = await self.table.fresh()
        snapshot = table.by_id(source) if source is not None else None
        candidate = snapshot.candidate if snapshot is not None else None
        if candidate is None:
            raise OSError(errno.ENOENT, f"blob {layer_hex[:12]} has no bootstrap any more")
        blob_meta = await trio.to_thread.run_sync(self._read_blob_meta, layer_hex)
        if blob_meta is None:
            raise OSError(errno.ENOENT, f"blob {layer_hex[:12]} has no blob.meta")
        index = await self._index(candidate, blob_meta)
        _, entries = await trio.to_thread.run_sync(decode_blob_meta, blob_meta)
        cache = await trio.to_thread.run_sync(functools.partial(
            BlobCache, self.dirs.lazy_cache_fd(), layer_hex, chunk_count=len(entries), size=chunk_plan.cache_size(entries)
        ))
        log.info("blob %s: serving %d chunks, %d cached", layer_hex[:12], len(entries), cache.present_count)
        return LazyBlob(
            layer_hex, entries, index, cache, functools.partial(self._reader, candidate),
            fetch_slots=self._slots, spawn=self._spawn, policy=FetchPolicy(),
        )

    async def _index(self, candidate: LayerCandidate, blob_meta: bytes) -> blobindex.BlobIndex:
        """The blob's index file, made by the capped indexer when missing or for another blob.meta.

        A cache filled under another blob.meta describes other chunks: it goes with it.
        """
        cache_fd, layer_hex = self.dirs.lazy_cache_fd(), candidate.layer_hex
        name = layout.blob_index_name(layer_hex)
        existing = await trio.to_thread.run_sync(_read_file, cache_fd, name)
        if existing is not None:
            try:
                return blobindex.decode(existing, blob_meta)
            except StargzfsError as exc:
                log.info("blob %s: rebuilding its index (%s)", layer_hex[:12], exc)
                for stale in (name, layer_hex, layout.chunk_map_name(layer_hex)):
                    unlink_quietly(cache_fd, stale)
        fs_fd = self.dirs.open_fs(candidate.snapshot_id)
        try:
            meta_fd = self.dirs.blob_meta_dir(fs_fd)
            argv = [
                *self.indexer.command, "blob-index",
                "--toc", proc_path(fs_fd, layout.TOC_FILE),
                "--blob-meta", proc_path(meta_fd, layout.blob_meta_name(layer_hex)),
                "-o", proc_path(cache_fd, name),
            ]
            await run_builder(self.indexer, argv, sorted({fs_fd, meta_fd, cache_fd}), f"indexing blob {layer_hex[:12]}")
        finally:
            os.close(fs_fd)
        data = await trio.to_thread.run_sync(_read_file, cache_fd, name)
        if data is None:
            raise StargzfsError(f"blob {layer_hex[:12]}: the indexer wrote no index")
        return blobindex.decode(data, blob_meta)

    async def _reader(self, candidate: LayerCandidate):  # type: ignore[no-untyped-def]
        reference = parse_reference(candidate.image_ref)
        given = Credentials(*candidate.pull_credentials) if candidate.pull_credentials else None
        found = await self.credentials.resolve(reference, given)
        client = await self.registry()
        return client.blob(reference, candidate.layer_digest, credentials=found, resolved=True)

    def _start_background(self, blob: LazyBlob) -> None:
        prefetch = blob.prefetch_chunks() if self.settings.prefetch else []
        if not prefetch and not self.settings.background_fetch:
            return

        async def work() -> None:
            if prefetch:
                log.info("blob %s: prefetching %d chunks", blob.blob_id[:12], len(prefetch))
                await blob.fill(prefetch, yield_to_reads=False)
            if self.settings.background_fetch:
                await blob.fill(blob.all_chunks(), yield_to_reads=True)
                log.info("blob %s: background fetch done", blob.blob_id[:12])
            await self._record(blob.blob_id, blob, force=True)

        self._spawn(work)

    async def _record(self, layer_hex: str, blob: LazyBlob, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._recorded.get(layer_hex, 0.0) < _RECORD_INTERVAL:
            return
        self._recorded[layer_hex] = now
        stats = blob.stats
        await self.recorder.blob(
            layer_hex, fetched_bytes=stats.bytes_fetched, requests=stats.requests,
            chunks_fetched=stats.chunks_fetched, chunks_cached=blob.cache.present_count, chunks=blob.chunk_count,
        )


def _read_file(dir_fd: int, name: str) -> bytes | None:
    info = lstat_at(dir_fd, name)
    if info is None or not stat.S_ISREG(info.st_mode):
        return None
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.pread(fd, info.st_size, 0)
    finally:
        os.close(fd)

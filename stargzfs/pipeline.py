"""What a stargzfs mount of a snapshotter root shows (the Provider behind MNT/), and when it converts.

MNT/<id>/ is ROOT/snapshots/<id>/fs/ for every snapshot in ROOT/metadata.db whose `fs`
dir exists. In an eStargz candidate's dir, `<hex>` (its layer bootstrap) and `image.boot`
(its chain merged) are listed before they exist and built on first lookup:
convert.py does one layer, compose.py the merge; this module decides when, keeps one
conversion per key in flight (single-flight), remembers "not eStargz", backs off after
failures and records every outcome in ROOT/stargzfs/state.json for `stargzfs status`.

Layers are keyed by digest, not snapshot: the same layer in several chains has its TOC
fetched and its bootstrap built once; the other snapshots' dirs get copies of the outputs.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from stargzfs import state
from stargzfs.compose import ChainLayer, compose_image
from stargzfs.convert import (
    ConversionError,
    ConversionPlan,
    NotConvertible,
    convert_layer,
    copy_layer_outputs,
    detect_builder,
    remove_temps,
    temp_name_patterns,
)
from stargzfs.errors import StargzfsError, UsageError
from stargzfs.estargz.toc import TOC_NAME
from stargzfs.fdpath import lstat_at, open_dir_beneath
from stargzfs.fuse.provider import ChangeNotifier
from stargzfs.registry import RegistryClient, RegistryConfig
from stargzfs.registry.auth import CredentialCache
from stargzfs.settings import MountSettings
from stargzfs.snapshots.store import IMAGE_BOOT, Snapshot, SnapshotSource, SnapshotTable, candidate_reason

log = logging.getLogger(__name__)


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    error: OSError | None = None


@dataclass
class _Failure:
    attempts: int
    retry_at: float
    message: str


class SnapshotRootProvider:
    """Provider for a nydus-snapshotter root (see stargzfs.fuse.provider.Provider)."""

    def __init__(self, settings: MountSettings) -> None:
        self.settings = settings
        self.root = settings.root
        db = settings.metadata_db
        if not db.is_file():
            raise UsageError(f"{self.root} is not a snapshotter root: {db.name} is missing")
        self.snapshots = SnapshotSource(db)
        self.snapshots.current()  # a broken metadata.db is a start-up error, not an EIO later
        self._refreshing = False  # a worker thread is re-reading metadata.db
        self._table_error: str | None = None  # why the last re-read failed (logged once)
        self.builder = detect_builder(settings.nydus_image)  # a bad --nydus-image fails the mount
        self.fscache = settings.fs_driver == "fscache"
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache_fd = -1 if self.fscache else self._open_cache_dir()
        self._flights: dict[tuple[str, str], _Flight] = {}
        self._failures: dict[tuple[str, str], _Failure] = {}
        self._not_estargz: dict[str, str] = {}  # layer hex -> why
        self._images_not_estargz: dict[str, str] = {}  # snapshot id -> why
        self._builder_slots: trio.CapacityLimiter | None = None
        self._client: RegistryClient | None = None
        self._credentials = CredentialCache()
        self._layer_sources: dict[str, str] = {}  # layer hex -> a snapshot id whose fs dir has its outputs
        self.conversions = 0
        self._notifier: ChangeNotifier | None = None
        self._startup_notes = self._remove_stale_temps()

    def bind_notifier(self, notifier: ChangeNotifier) -> None:
        """The mount's cache invalidation; set once it talks to the kernel."""
        self._notifier = notifier
        # The provider is built before the daemon configures logging (so a bad ROOT fails the
        # `mount` command itself): what start-up did is logged now, once logging is set up.
        for note in self._startup_notes:
            log.info("%s", note)
        self._startup_notes = []

    def _layer_outputs(self, layer_hex: str) -> list[str]:
        names = [layer_hex, TOC_NAME]
        return names + [f"{layer_hex}.blob.meta"] if self.fscache else names

    def _changed(self, snapshot_id: str, *names: str) -> None:
        """Files appeared in MNT/<snapshot_id>/: the kernel must not serve stale entries/attrs."""
        if self._notifier is not None:
            for name in names:
                self._notifier.notify_changed(snapshot_id, name)

    # ----------------------------------------------------------------- start-up
    def _open_cache_dir(self) -> int:
        """The fusedev blob.meta dir; under ROOT it is reached without following symlinks."""
        cache = self.settings.effective_cache_dir
        try:
            relative = cache.relative_to(self.root)
        except ValueError:
            relative = None
        try:
            if relative is not None and relative.parts:
                return open_dir_beneath(self._root_fd, relative.parts, create=True)
            cache.mkdir(parents=True, exist_ok=True)
            return os.open(cache, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cache dir {cache} is not usable: {exc.strerror}") from None

    def _remove_stale_temps(self) -> list[str]:
        """A daemon killed mid-conversion leaves temps; nothing may ever show or reuse them.

        Only the dirs this mount writes into are swept: those of eStargz candidates and the
        cache dir. Other snapshots' dirs (containers' rootfs, nydus layers) are not ours, so
        a user file that happens to match a temp pattern stays. Returns what was removed.
        """
        notes = []
        for snapshot in self.snapshots.current().all():
            if candidate_reason(snapshot) is not None:
                continue
            try:
                fs_fd = self._open_fs(snapshot.id)
            except OSError:
                continue
            try:
                for name in remove_temps(fs_fd):
                    notes.append(f"removed stale temp snapshots/{snapshot.id}/fs/{name}")
            finally:
                os.close(fs_fd)
        if self._cache_fd >= 0:
            for name in remove_temps(self._cache_fd):
                notes.append(f"removed stale temp {self.settings.effective_cache_dir}/{name}")
        return notes

    # ----------------------------------------------------------------- metadata.db
    def _table(self) -> SnapshotTable:
        """The snapshot table as last read, for the sync Provider methods on the event loop.

        Never reads metadata.db here (a re-read may sleep while containerd commits): when
        the file changed, a worker thread re-reads it and later calls see the new table.
        """
        if self.snapshots.is_stale():
            self._start_refresh()
        table = self.snapshots.cached()
        assert table is not None  # read at start-up
        return table

    async def _fresh_table(self) -> SnapshotTable:
        """The latest snapshot table for the async paths, re-read in a worker thread if needed."""
        if self.snapshots.is_stale():
            await trio.to_thread.run_sync(self._reload)
        table = self.snapshots.cached()
        assert table is not None
        return table

    def _start_refresh(self) -> None:
        if self._refreshing:
            return
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # not on the event loop: nothing to keep responsive
            self._reload()
            return
        self._refreshing = True
        trio.lowlevel.spawn_system_task(self._refresh)

    async def _refresh(self) -> None:
        try:
            await trio.to_thread.run_sync(self._reload)
        finally:
            self._refreshing = False

    def _reload(self) -> None:
        """Re-read metadata.db (blocking); on failure keep serving the last good read."""
        try:
            self.snapshots.current()
        except (StargzfsError, OSError) as exc:
            message = str(exc)
            if message != self._table_error:
                log.error("reading %s: %s (serving the last good read)", self.settings.metadata_db, message)
            self._table_error = message
        else:
            self._table_error = None

    # ----------------------------------------------------------------- Provider interface

    def top_dirs(self) -> Mapping[str, Path]:
        table = self._table()
        tops: dict[str, Path] = {}
        for snapshot in table.all():
            fs_dir = self.root / "snapshots" / snapshot.id / "fs"
            try:
                if stat.S_ISDIR(os.lstat(fs_dir).st_mode):
                    tops[snapshot.id] = fs_dir
            except OSError:
                continue
        return tops

    def _candidate(self, top: str, table: SnapshotTable | None = None) -> Snapshot | None:
        snapshot = (table or self._table()).by_id(top)
        if snapshot is None or candidate_reason(snapshot) is not None:
            return None
        return snapshot

    def virtual_names(self, top: str) -> Sequence[str]:
        snapshot = self._candidate(top)
        if snapshot is None or snapshot.layer_hex in self._not_estargz:
            return ()
        assert snapshot.layer_hex is not None
        if top in self._images_not_estargz:
            return (snapshot.layer_hex,)
        return (snapshot.layer_hex, IMAGE_BOOT)

    def is_hidden(self, top: str, name: str) -> bool:
        """Temps are hidden only where this mount writes them: other dirs are the user's."""
        return temp_name_patterns(name) and self._candidate(top) is not None

    async def materialize(self, top: str, name: str) -> None:
        snapshot = self._candidate(top, await self._fresh_table())
        if snapshot is None:
            raise OSError(errno.ENOENT, f"{top} is not an eStargz candidate")
        if name == snapshot.layer_hex:
            await self._ensure_layer(snapshot)
        elif name == IMAGE_BOOT:
            await self._ensure_image(snapshot)
        else:
            raise OSError(errno.ENOENT, f"{top}/{name} is not produced by this mount")

    # ----------------------------------------------------------------- machinery
    def _slots(self) -> trio.CapacityLimiter:
        if self._builder_slots is None:
            self._builder_slots = trio.CapacityLimiter(self.settings.max_builders)
        return self._builder_slots

    async def _registry(self) -> RegistryClient:
        if self._client is None:
            settings = self.settings
            client = RegistryClient(RegistryConfig(
                insecure_hosts=tuple(settings.insecure_registries),
                timeout=settings.registry_timeout,
                retries=settings.registry_retries,
                auth_timeout=settings.auth_timeout,
            ))
            self._client = client
            await client.__aenter__()
        return self._client

    async def _single_flight(self, key: tuple[str, str], work: Callable[[], Awaitable[None]]) -> bool:
        """Run `work` once per key at a time; concurrent callers share its outcome.

        True when this call ran `work`, False when it waited for another caller's run.
        """
        flight = self._flights.get(key)
        if flight is not None:
            await flight.done.wait()
            if flight.error is not None:
                raise OSError(flight.error.errno, flight.error.strerror)
            return False
        flight = _Flight()
        self._flights[key] = flight
        try:
            await work()
        except OSError as exc:
            flight.error = exc
            raise
        except BaseException:
            flight.error = OSError(errno.EIO, "conversion interrupted")
            raise
        finally:
            del self._flights[key]
            flight.done.set()
        return True

    def _check_backoff(self, key: tuple[str, str]) -> None:
        failure = self._failures.get(key)
        if failure is not None and time.monotonic() < failure.retry_at:
            raise OSError(errno.EIO, failure.message)

    def _note_failure(self, key: tuple[str, str], message: str) -> None:
        previous = self._failures.get(key)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(self.settings.retry_backoff * 2 ** (attempts - 1), self.settings.retry_backoff_max)
        self._failures[key] = _Failure(attempts, time.monotonic() + delay, message)
        log.error("%s (retry in %.1fs)", message, delay)

    async def _record(self, recorder: Callable[..., None], *args: object, **kwargs: object) -> None:
        """state.json is a diagnostic aid: a failure to write it is logged, not fatal."""
        try:
            await trio.to_thread.run_sync(functools.partial(recorder, self.root, *args, **kwargs))
        except (OSError, StargzfsError) as exc:
            log.warning("cannot record state: %s", exc)

    def _open_fs(self, snapshot_id: str) -> int:
        return open_dir_beneath(self._root_fd, ["snapshots", snapshot_id, "fs"])

    # ----------------------------------------------------------------- one layer
    async def _ensure_layer(self, snapshot: Snapshot) -> None:
        """`<hex>` in the snapshot's fs dir, or OSError ENOENT (not eStargz) / EIO (failed).

        Flight and backoff are per layer digest. A caller that waited on another snapshot's
        flight for the same digest then runs its own (normally a copy of that one's outputs).
        """
        layer_hex = snapshot.layer_hex
        assert layer_hex is not None
        key = ("layer", layer_hex)
        while True:
            reason = self._not_estargz.get(layer_hex)
            if reason is not None:
                raise OSError(errno.ENOENT, reason)
            self._check_backoff(key)
            if await self._single_flight(key, lambda: self._provide_layer(snapshot, key)):
                return

    async def _local_failure(self, snapshot: Snapshot, detail: str) -> OSError:
        """A problem of one snapshot's dir, not of the layer: EIO without a digest-wide backoff."""
        message = f"snapshot {snapshot.id}: {detail}"
        log.error("%s", message)
        await self._record(state.record_layer, snapshot.layer_hex, status="error", error=message,
                           snapshot_id=snapshot.id)
        return OSError(errno.EIO, message)

    async def _provide_layer(self, snapshot: Snapshot, key: tuple[str, str]) -> None:
        layer_hex = snapshot.layer_hex
        assert layer_hex is not None
        try:
            fs_fd = self._open_fs(snapshot.id)
        except OSError as exc:
            raise await self._local_failure(snapshot, f"fs dir is not usable: {exc.strerror}") from None
        try:
            existing = lstat_at(fs_fd, layer_hex)
            if existing is not None:
                if stat.S_ISREG(existing.st_mode):
                    return
                raise await self._local_failure(snapshot, f"{layer_hex} exists but is not a regular file")
            if not await self._copy_from_sibling(snapshot, fs_fd):
                await self._convert(snapshot, fs_fd, key)
        finally:
            os.close(fs_fd)

    def _sibling_sources(self, snapshot: Snapshot) -> list[str]:
        """Other candidate snapshots of the same layer digest, the last known source first."""
        layer_hex = snapshot.layer_hex
        known = self._layer_sources.get(layer_hex or "")
        ids = [known] if known is not None and known != snapshot.id else []
        for other in self._table().all():
            if (other.id != snapshot.id and other.id not in ids and other.layer_hex == layer_hex
                    and candidate_reason(other) is None):
                ids.append(other.id)
        return ids

    def _copy_from_first(self, source_ids: Sequence[str], dst_fd: int, layer_hex: str) -> str | None:
        """Copy the outputs from the first source that has them (blocking: runs in a thread)."""
        for source_id in source_ids:
            try:
                src_fd = self._open_fs(source_id)
            except OSError:
                continue
            try:
                copy_layer_outputs(src_fd, dst_fd, layer_hex, with_blob_meta=self.fscache)
                return source_id
            except ConversionError:
                continue  # that snapshot has no complete outputs (yet, or any more)
            finally:
                os.close(src_fd)
        return None

    async def _copy_from_sibling(self, snapshot: Snapshot, fs_fd: int) -> bool:
        """Outputs copied from another snapshot of the same digest: no TOC fetch, no builder."""
        layer_hex = snapshot.layer_hex
        assert layer_hex is not None
        sources = self._sibling_sources(snapshot)
        if not sources:
            return False
        try:
            source_id = await trio.to_thread.run_sync(self._copy_from_first, sources, fs_fd, layer_hex)
        except OSError as exc:
            detail = f"copying layer {layer_hex[:12]} failed: {exc.strerror}"
            raise await self._local_failure(snapshot, detail) from None
        if source_id is None:
            return False
        self._layer_sources[layer_hex] = source_id
        log.info("snapshot %s: copied layer %s from snapshot %s", snapshot.id, layer_hex[:12], source_id)
        self._changed(snapshot.id, *self._layer_outputs(layer_hex))
        await self._record(state.record_layer, layer_hex, status="converted", snapshot_id=snapshot.id)
        return True

    async def _convert(self, snapshot: Snapshot, fs_fd: int, key: tuple[str, str]) -> None:
        layer_hex = snapshot.layer_hex
        assert layer_hex is not None
        started = time.monotonic()
        try:
            plan = ConversionPlan(snapshot, fs_fd, fs_fd if self.fscache else self._cache_fd)
            created = await convert_layer(
                plan, client=await self._registry(), credentials=self._credentials, builder=self.builder,
                builder_slots=self._slots(),
            )
        except NotConvertible as exc:
            reason = str(exc)
            self._not_estargz[layer_hex] = reason
            log.info("snapshot %s layer %s: %s", snapshot.id, layer_hex[:12], reason)
            await self._record(state.record_layer, layer_hex, status="not-estargz", error=reason,
                               snapshot_id=snapshot.id)
            raise OSError(errno.ENOENT, reason) from None
        except OSError as exc:  # this snapshot's dir, not the layer: no digest-wide backoff
            detail = f"layer sha256:{layer_hex}: writing outputs: {exc.strerror or exc}"
            raise await self._local_failure(snapshot, detail) from None
        except (ConversionError, StargzfsError) as exc:
            detail = str(exc)
            # registry errors already name the blob: the digest appears once in the message
            prefix = f"snapshot {snapshot.id}" if layer_hex in detail else f"snapshot {snapshot.id} layer sha256:{layer_hex}"
            message = f"{prefix}: {detail}"
            self._note_failure(key, message)
            await self._record(state.record_layer, layer_hex, status="error", error=message, snapshot_id=snapshot.id)
            raise OSError(errno.EIO, message) from None
        self._failures.pop(key, None)
        self._layer_sources[layer_hex] = snapshot.id
        if created:
            self.conversions += 1
            self._changed(snapshot.id, *self._layer_outputs(layer_hex))
            log.info("snapshot %s: converted layer %s in %.2fs", snapshot.id, layer_hex[:12],
                     time.monotonic() - started)
            await self._record(state.record_layer, layer_hex, status="converted", snapshot_id=snapshot.id)

    # ----------------------------------------------------------------- image.boot
    async def _ensure_image(self, snapshot: Snapshot) -> None:
        reason = self._images_not_estargz.get(snapshot.id)
        if reason is not None:
            raise OSError(errno.ENOENT, reason)
        key = ("image", snapshot.id)
        self._check_backoff(key)
        await self._single_flight(key, lambda: self._compose(snapshot, key))

    async def _image_not_estargz(self, snapshot: Snapshot, reason: str) -> OSError:
        self._images_not_estargz[snapshot.id] = reason
        log.info("snapshot %s: no image.boot: %s", snapshot.id, reason)
        await self._record(state.record_image, snapshot.id, status="not-estargz", error=reason)
        return OSError(errno.ENOENT, reason)

    async def _compose(self, snapshot: Snapshot, key: tuple[str, str]) -> None:
        table = await self._fresh_table()
        try:
            chain = table.chain(snapshot.id)
        except KeyError:
            raise OSError(errno.ENOENT, f"snapshot {snapshot.id} is gone") from None
        for layer in chain:
            why = candidate_reason(layer)
            if why is None and layer.layer_hex in self._not_estargz:
                why = self._not_estargz[layer.layer_hex]
            if why is not None:
                raise await self._image_not_estargz(snapshot, f"layer snapshot {layer.id}: {why}")

        outcomes: dict[str, OSError] = {}

        async def build(layer: Snapshot) -> None:
            try:
                await self._ensure_layer(layer)
            except OSError as exc:
                outcomes[layer.id] = exc

        async with trio.open_nursery() as nursery:
            for layer in chain:
                nursery.start_soon(build, layer)
        for layer in chain:
            problem = outcomes.get(layer.id)
            if problem is not None and problem.errno == errno.ENOENT:
                raise await self._image_not_estargz(snapshot, f"layer snapshot {layer.id}: {problem.strerror}")
        for layer in chain:
            problem = outcomes.get(layer.id)
            if problem is not None:
                message = f"image.boot of snapshot {snapshot.id}: layer snapshot {layer.id} failed: {problem.strerror}"
                await self._record(state.record_image, snapshot.id, status="error", error=message)
                raise OSError(errno.EIO, message)

        fds: dict[str, int] = {}
        try:
            try:
                for layer in chain:
                    fds[layer.id] = self._open_fs(layer.id)
                top_fd = fds[snapshot.id] if snapshot.id in fds else self._open_fs(snapshot.id)
                fds.setdefault(snapshot.id, top_fd)
                layers = [ChainLayer(layer.id, layer.layer_hex or "", fds[layer.id]) for layer in chain]
                created = await compose_image(
                    top_fd, layers, builder=self.builder, builder_slots=self._slots(), fscache=self.fscache
                )
            except (ConversionError, StargzfsError, OSError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                message = f"image.boot of snapshot {snapshot.id}: {detail}"
                self._note_failure(key, message)
                await self._record(state.record_image, snapshot.id, status="error", error=message)
                raise OSError(errno.EIO, message) from None
        finally:
            for fd in set(fds.values()):
                os.close(fd)
        self._failures.pop(key, None)
        if created:
            copies = [f"{layer.layer_hex}.blob.meta" for layer in chain if self.fscache and layer.id != snapshot.id]
            self._changed(snapshot.id, IMAGE_BOOT, *copies)
            log.info("snapshot %s: image.boot from %d layer(s)", snapshot.id, len(chain))
            await self._record(state.record_image, snapshot.id, status="merged")

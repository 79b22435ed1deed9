"""What a stargzfs mount of a snapshotter root shows (the Provider behind MNT/), and dispatch.

MNT/<id>/ is ROOT/snapshots/<id>/fs/ for every snapshot in ROOT/metadata.db whose `fs`
dir exists. In an eStargz candidate's dir, `<hex>` (its layer bootstrap) and `image.boot`
(its chain merged) are listed before they exist; the FUSE layer calls `materialize` on
their first stat or open, which hands them to the layer converter or the image composer.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import trio

from stargzfs import metrics
from stargzfs.conversion.blobs import LAZY_DIR, BlobService, BlobSettings
from stargzfs.conversion.builder import bundled_builder, detect_builder
from stargzfs.conversion.context import MountContext
from stargzfs.conversion.gate import ConversionGate
from stargzfs.conversion.image import ImageComposer
from stargzfs.conversion.layer import LayerConverter
from stargzfs.conversion.rootdirs import RootDirs
from stargzfs.conversion.state import StateRecorder
from stargzfs.conversion.table import LiveTable
from stargzfs.errors import UsageError
from stargzfs.fuse.provider import ChangeNotifier
from stargzfs.registry import CredentialCache, RegistryClient, RegistryConfig
from stargzfs.settings import MountSettings
from stargzfs.snapshots import layout
from stargzfs.snapshots.store import LayerCandidate

log = logging.getLogger(__name__)


class SnapshotRootProvider:
    """Provider for a nydus-snapshotter root (see stargzfs.fuse.provider.Provider)."""

    def __init__(self, settings: MountSettings) -> None:
        self.settings = settings
        self.root = settings.root
        db = settings.metadata_db
        if not db.is_file():
            raise UsageError(f"{self.root} is not a snapshotter root: {db.name} is missing")
        self.table = LiveTable(db)
        limits = {"memory_mib": settings.builder_memory_mib, "cpu_seconds": settings.builder_cpu_seconds}
        builder = detect_builder(settings.nydus_image).limited(**limits).warm()  # a bad --nydus-image fails the mount
        indexer = builder if builder.server is not None else bundled_builder().limited(**limits).warm()
        self.dirs = RootDirs(self.root, settings.effective_cache_dir, fscache=settings.fs_driver == "fscache")
        recorder = StateRecorder(self.root)
        slots = trio.CapacityLimiter(settings.max_builders)
        self._client: RegistryClient | None = None
        self._notifier: ChangeNotifier | None = None
        # Bound now, so a taken port fails `stargzfs mount` itself; served from the daemon (bind_notifier).
        self._metrics = metrics.MetricsServer(settings.metrics_address) if settings.metrics_address else None
        credentials = CredentialCache()
        self.blobs = BlobService(
            dirs=self.dirs, table=self.table, recorder=recorder, indexer=indexer,
            registry=self._registry, credentials=credentials,
            settings=BlobSettings(prefetch=settings.prefetch, background_fetch=settings.background_fetch),
        )
        context = MountContext(self.dirs, self.table, recorder, builder, slots, self._changed)
        self.layers = LayerConverter(
            context, self._gate(), registry=self._registry, credentials=credentials, on_bootstrap=self.blobs.note,
        )
        self.images = ImageComposer(context, self._gate(), layers=self.layers)
        candidates = [s.id for s in self.table.cached().all() if s.candidate is not None]
        self._startup_notes = self.dirs.sweep_temps(candidates)

    @property
    def conversions(self) -> int:
        return self.layers.conversions

    def _gate(self) -> ConversionGate:
        return ConversionGate(self.settings.retry_backoff, self.settings.retry_backoff_max)

    def bind_notifier(self, notifier: ChangeNotifier) -> None:
        """The mount's cache invalidation; set once it talks to the kernel."""
        self._notifier = notifier
        if self._metrics is not None:
            self._metrics.start()
            log.info("metrics at http://%s:%d/metrics", *self._metrics.address)
        # The provider is built before the daemon configures logging (so a bad ROOT fails the
        # `mount` command itself): what start-up did is logged now, once logging is set up.
        for note in self._startup_notes:
            log.info("%s", note)
        self._startup_notes = []

    def bind_nursery(self, nursery: trio.Nursery) -> None:
        """Where background work outliving a request runs (prefetch, readahead of lazy blobs)."""
        self.blobs.bind_nursery(nursery)

    async def warm_up(self) -> None:
        """One-time costs paid before the mount reports ready, not by the first lookup: the
        builder's fork server importing the builder (~0.1-0.2 s), the registry client."""
        server = self.layers.builder.server or self.blobs.indexer.server
        async with trio.open_nursery() as nursery:
            if server is not None:
                nursery.start_soon(server.start)
            nursery.start_soon(self._warm_fetching)

    async def _warm_fetching(self) -> None:
        """Pay the TOC fetch's one-time costs at mount time, not in the first lookup (measured
        on the first conversion): the HTTP client for the system trust store (~22 ms loading
        it), anyio's trio backend, imported on anyio's first call (~35 ms), which the credential
        lookup and every request's deadline go through, and tarfile, which the gzip TOC reader
        imports on first use (~6 ms; kept off the builder's start-up)."""
        try:
            (await self._registry()).http
            await anyio.to_thread.run_sync(importlib.import_module, "tarfile")
        except Exception as exc:  # the first lookup meets it again and reports it there
            log.warning("warming the registry client failed: %s", exc)

    def _changed(self, snapshot_id: str, *names: str) -> None:
        """Files appeared in MNT/<snapshot_id>/: the kernel must not serve stale entries/attrs."""
        if self._notifier is not None:
            for name in names:
                self._notifier.notify_changed(snapshot_id, name)

    async def _registry(self) -> RegistryClient:
        """One pooled client for the mount's lifetime, opened on the event loop at first use."""
        if self._client is None:
            settings = self.settings
            client = RegistryClient(RegistryConfig(
                insecure_hosts=tuple(settings.insecure_registries),
                timeout=settings.registry_timeout,
                retries=settings.registry_retries,
                auth_timeout=settings.auth_timeout,
                min_rate=settings.registry_min_rate,
                hosts_dir=settings.effective_hosts_dir,
            ))
            self._client = client
            await client.__aenter__()
        return self._client

    # ----------------------------------------------------------------- Provider interface
    def top_dirs(self) -> Mapping[str, Path]:
        tops: dict[str, Path] = {}
        for snapshot in self.table.cached().all():
            fs_dir = layout.fs_dir(self.root, snapshot.id)
            try:
                if stat.S_ISDIR(os.lstat(fs_dir).st_mode):
                    tops[snapshot.id] = fs_dir
            except OSError:
                continue
        return tops

    def _candidate(self, top: str) -> LayerCandidate | None:
        snapshot = self.table.cached().by_id(top)
        return snapshot.candidate if snapshot is not None else None

    def virtual_names(self, top: str) -> Sequence[str]:
        candidate = self._candidate(top)
        if candidate is None:
            return ()
        refused = self.layers.refusal(candidate)
        if refused is not None and refused[0] == errno.ENOENT:  # "no bootstrap": not offered
            return ()
        bootstrap = layout.bootstrap_name(candidate.layer_hex)
        if self.images.refusal(top) is not None:
            return (bootstrap,)
        return (bootstrap, layout.IMAGE_BOOT)

    def is_hidden(self, top: str, name: str) -> bool:
        """Temps are hidden only where this mount writes them: other dirs are the user's."""
        return layout.is_temp_name(name) and self._candidate(top) is not None

    async def materialize(self, top: str, name: str) -> None:
        snapshot = (await self.table.fresh()).by_id(top)
        candidate = snapshot.candidate if snapshot is not None else None
        if snapshot is None or candidate is None:
            raise OSError(errno.ENOENT, f"{top} is not an eStargz candidate")
        if name == layout.bootstrap_name(candidate.layer_hex):
            await self.layers.ensure(candidate)
            metrics.BOOTSTRAPS_SERVED.inc()
        elif name == layout.IMAGE_BOOT:
            await self.images.ensure(snapshot)
            metrics.IMAGE_BOOTS_SERVED.inc()
        else:
            raise OSError(errno.ENOENT, f"{top}/{name} is not produced by this mount")

    # ----------------------------------------------------------------- lazy blob files
    lazy_dir = LAZY_DIR

    def lazy_files(self) -> Mapping[str, int]:
        return self.blobs.files()

    async def open_lazy(self, name: str) -> None:
        await self.blobs.open(name)

    async def read_lazy(self, name: str, offset: int, size: int) -> bytes:
        return await self.blobs.read(name, offset, size)

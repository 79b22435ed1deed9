"""image.boot of one snapshot: its chain's layer bootstraps merged base-first (snapshotter §5.3).

Every layer of the chain is converted first (in parallel, each through the layer
converter's single flight); a single-layer chain is then a copy (reflink where the
filesystem can), longer ones a `merge` by the builder. With fscache the lower layers'
`<hex>.blob.meta` are copied into the top snapshot's fs dir, because nydusd's fscache work
dir is that one directory.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from stargzfs import metrics
from stargzfs.conversion.builder import Builder, run_builder
from stargzfs.conversion.context import Converter, MountContext
from stargzfs.conversion.errors import ConversionError
from stargzfs.conversion.gate import ConversionGate
from stargzfs.conversion.layer import LayerConverter
from stargzfs.errors import StargzfsError
from stargzfs.fdpath import copy_file_at, is_regular_at, lstat_at, proc_path, publish, unlink_quietly
from stargzfs.snapshots import layout
from stargzfs.snapshots.store import LayerCandidate, Snapshot, candidate_reason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainLayer:
    """One layer of the chain with its (already converted) bootstrap."""

    snapshot_id: str
    layer_hex: str
    fs_dir_fd: int


def _copy(src_fd: int, src: str, dst_fd: int, dst: str) -> bool:
    return copy_file_at(src_fd, src, dst_fd, dst, mode=layout.OUTPUT_MODE, temp=layout.merge_temp_name())


@metrics.timed("merge")
async def compose_image(
    top_fs_fd: int,
    layers_base_first: Sequence[ChainLayer],
    *,
    builder: Builder,
    builder_slots: trio.CapacityLimiter,
    fscache: bool,
) -> bool:
    """Write image.boot (0440) into the top fs dir; False when it already existed."""
    if not layers_base_first:
        raise ConversionError("no layers to merge")
    existing = lstat_at(top_fs_fd, layout.IMAGE_BOOT)
    if existing is not None:
        if not stat.S_ISREG(existing.st_mode):
            raise ConversionError(f"{layout.IMAGE_BOOT} exists but is not a regular file")
        return False
    for layer in layers_base_first:
        if not is_regular_at(layer.fs_dir_fd, layout.bootstrap_name(layer.layer_hex)):
            raise ConversionError(
                f"snapshot {layer.snapshot_id}: bootstrap {layer.layer_hex} is missing or not a regular file"
            )
    if fscache:
        for layer in layers_base_first[:-1]:
            meta = layout.blob_meta_name(layer.layer_hex)
            if is_regular_at(layer.fs_dir_fd, meta) and lstat_at(top_fs_fd, meta) is None:
                await trio.to_thread.run_sync(_copy, layer.fs_dir_fd, meta, top_fs_fd, meta)
    if len(layers_base_first) == 1:
        only = layers_base_first[0]
        # a copy + fsync of a bootstrap blocks: the daemon's event loop must keep serving meanwhile
        return await trio.to_thread.run_sync(
            _copy, only.fs_dir_fd, layout.bootstrap_name(only.layer_hex), top_fs_fd, layout.IMAGE_BOOT
        )
    temp = layout.merge_temp_name()
    argv = builder.merge_argv(
        bootstrap=proc_path(top_fs_fd, temp),
        sources=[proc_path(layer.fs_dir_fd, layout.bootstrap_name(layer.layer_hex)) for layer in layers_base_first],
    )
    fds = {top_fs_fd, *(layer.fs_dir_fd for layer in layers_base_first)}
    try:
        async with builder_slots:
            await run_builder(builder, argv, sorted(fds), f"merging {len(layers_base_first)} layers")
        if lstat_at(top_fs_fd, temp) is None:
            raise ConversionError(f"{builder.name} merge wrote no bootstrap")
        return await trio.to_thread.run_sync(publish, top_fs_fd, temp, layout.IMAGE_BOOT, layout.OUTPUT_MODE)
    finally:
        unlink_quietly(top_fs_fd, temp)


class ImageComposer(Converter):
    """image.boot in a snapshot's fs dir on demand: its chain converted, then merged once."""

    def __init__(self, context: MountContext, gate: ConversionGate, *, layers: LayerConverter) -> None:
        super().__init__(context, gate)
        self.layers = layers

    def refusal(self, snapshot_id: str) -> tuple[int, str] | None:
        return self.gate.refusal(snapshot_id)

    async def ensure(self, snapshot: Snapshot) -> None:
        """image.boot in the snapshot's fs dir, or OSError ENOENT (not all eStargz) / EIO."""
        await self.gate.run(snapshot.id, lambda: self._guarded(snapshot))

    async def _guarded(self, snapshot: Snapshot) -> None:
        """Anything but an OSError answer is a failed merge like any other (see LayerConverter)."""
        try:
            await self._compose(snapshot)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("snapshot %s: unexpected failure building image.boot", snapshot.id)
            raise await self._failed(snapshot, f"unexpected {type(exc).__name__}: {exc}", backoff=True) from None

    async def _not_estargz(self, snapshot: Snapshot, reason: str) -> OSError:
        self.gate.refuse(snapshot.id, reason)
        log.info("snapshot %s: no image.boot: %s", snapshot.id, reason)
        await self.recorder.image(snapshot.id, status="not-estargz", error=reason)
        return OSError(errno.ENOENT, reason)

    async def _failed(self, snapshot: Snapshot, detail: str, *, backoff: bool) -> OSError:
        message = f"image.boot of snapshot {snapshot.id}: {detail}"
        if backoff:
            delay = self.gate.failed(snapshot.id, message)
            log.error("%s (retry in %.1fs)", message, delay)
        await self.recorder.image(snapshot.id, status="error", error=message)
        return OSError(errno.EIO, message)

    async def _compose(self, snapshot: Snapshot) -> None:
        table = await self.table.fresh()
        try:
            chain = table.chain(snapshot.id)
        except KeyError:
            raise OSError(errno.ENOENT, f"snapshot {snapshot.id} is gone") from None
        candidates = await self._convert_chain(snapshot, chain)
        fds: dict[str, int] = {}
        try:
            try:
                for snapshot_id in [*(c.snapshot_id for c in candidates), snapshot.id]:
                    if snapshot_id not in fds:
                        fds[snapshot_id] = self.dirs.open_fs(snapshot_id)
                layers = [ChainLayer(c.snapshot_id, c.layer_hex, fds[c.snapshot_id]) for c in candidates]
                created = await compose_image(
                    fds[snapshot.id], layers, builder=self.builder, builder_slots=self.builder_slots,
                    fscache=self.dirs.fscache,
                )
            except (StargzfsError, OSError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise await self._failed(snapshot, detail, backoff=True) from None
        finally:
            for fd in fds.values():
                os.close(fd)
        self.gate.succeeded(snapshot.id)
        if created:
            copies = [
                layout.blob_meta_name(c.layer_hex) for c in candidates if self.dirs.fscache and c.snapshot_id != snapshot.id
            ]
            self.changed(snapshot.id, layout.IMAGE_BOOT, *copies)
            log.info("snapshot %s: image.boot from %d layer(s)", snapshot.id, len(chain))
            await self.recorder.image(snapshot.id, status="merged")

    async def _convert_chain(self, snapshot: Snapshot, chain: Sequence[Snapshot]) -> list[LayerCandidate]:
        """Every layer's bootstrap, converted in parallel; ENOENT if one is not eStargz, else EIO."""
        candidates: list[LayerCandidate] = []
        for layer in chain:
            candidate = layer.candidate
            if candidate is None:
                raise await self._not_estargz(snapshot, f"layer snapshot {layer.id}: {candidate_reason(layer)}")
            refused = self.layers.refusal(candidate)
            if refused is not None and refused[0] == errno.ENOENT:
                raise await self._not_estargz(snapshot, f"layer snapshot {layer.id}: {refused[1]}")
            candidates.append(candidate)
        outcomes: dict[str, OSError] = {}

        async def convert(candidate: LayerCandidate) -> None:
            try:
                await self.layers.ensure(candidate)
            except OSError as exc:
                outcomes[candidate.snapshot_id] = exc

        async with trio.open_nursery() as nursery:
            for candidate in candidates:
                nursery.start_soon(convert, candidate)
        for layer in chain:
            problem = outcomes.get(layer.id)
            if problem is not None and problem.errno == errno.ENOENT:
                raise await self._not_estargz(snapshot, f"layer snapshot {layer.id}: {problem.strerror}")
        for layer in chain:
            problem = outcomes.get(layer.id)
            if problem is not None:
                raise await self._failed(snapshot, f"layer snapshot {layer.id} failed: {problem.strerror}", backoff=False)
        return candidates

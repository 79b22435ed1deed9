"""One layer: detect -> TOC -> `stargz.index.json` -> builder -> `<hex>` in its snapshot's fs dir.

A layer digest is converted once: the same layer in another chain gets copies of the
outputs (reflink where the filesystem can) instead of a second fetch and build. Outputs
appear atomically (temp + rename without replacing, `<hex>` last since it means "done")
and are 0440 before they become visible.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass

import trio

from stargzfs.conversion.builder import Builder, BuilderFailed, run_builder
from stargzfs.conversion.errors import ConversionError, NotConvertible
from stargzfs.conversion.gate import ConversionGate
from stargzfs.conversion.rootdirs import RootDirs
from stargzfs.conversion.state import StateRecorder
from stargzfs.conversion.table import LiveTable
from stargzfs.errors import NotEstargzError, StargzfsError, UnsupportedError
from stargzfs.estargz.fetch import TocResult, fetch_toc
from stargzfs.fdpath import NotRegularFile, copy_file_at, is_regular_at, lstat_at, proc_path, publish
from stargzfs.fdpath import unlink_quietly, write_file_at
from stargzfs.registry import CredentialCache, Credentials, RegistryClient, parse_reference
from stargzfs.snapshots import layout
from stargzfs.snapshots.store import LayerCandidate

log = logging.getLogger(__name__)

Changed = Callable[..., None]  # (snapshot_id, *names): files appeared in that snapshot's dir


@dataclass(frozen=True)
class LayerJob:
    """Where one layer's outputs go (the dir fds are owned by the caller)."""

    candidate: LayerCandidate
    fs_fd: int
    blob_meta_fd: int  # cache dir (fusedev) or the fs dir (fscache)


async def fetch_layer_toc(
    candidate: LayerCandidate, *, client: RegistryClient, credentials: CredentialCache
) -> TocResult:
    """The layer's TOC, verified against its toc.digest label; NotConvertible / ConversionError."""
    try:
        reference = parse_reference(candidate.image_ref)
        given = Credentials(*candidate.pull_credentials) if candidate.pull_credentials else None
        found = await credentials.resolve(reference, given)
        blob = client.blob(reference, candidate.layer_digest, credentials=found, resolved=True)
        # decompressing a TOC of up to 150 MiB takes a while: not on the event loop. Only the
        # builder subprocess (memory-capped) parses it: the daemon checks bytes and digest.
        return await fetch_toc(
            blob, expected_digest=candidate.toc_digest, offload=trio.to_thread.run_sync, parse=False
        )
    except NotEstargzError as exc:
        raise NotConvertible(str(exc) if str(exc).startswith("not eStargz") else f"not eStargz: {exc}") from None
    except UnsupportedError as exc:
        raise NotConvertible(f"unsupported eStargz layer: {exc}") from None
    except StargzfsError as exc:
        raise ConversionError(f"fetching TOC: {exc}") from None
    except OSError as exc:
        raise ConversionError(f"fetching TOC: {exc.strerror or exc}") from None


async def build_layer(job: LayerJob, result: TocResult, *, builder: Builder, builder_slots: trio.CapacityLimiter) -> None:
    """Write the TOC, run the builder on it, publish `<hex>` (OSError: this snapshot's dirs)."""
    layer_hex = job.candidate.layer_hex
    fs_fd, meta_fd = job.fs_fd, job.blob_meta_fd
    await trio.to_thread.run_sync(functools.partial(
        write_file_at, fs_fd, layout.TOC_FILE, result.raw, mode=layout.OUTPUT_MODE,
        temp=layout.convert_temp_name("-file-"),
    ))
    meta_name = layout.blob_meta_name(layer_hex)
    meta_info = lstat_at(meta_fd, meta_name)
    if meta_info is not None and not stat.S_ISREG(meta_info.st_mode):
        unlink_quietly(meta_fd, meta_name)  # ours to produce; never write through a planted link
    temp = layout.convert_temp_name()
    argv = builder.create_argv(
        bootstrap=proc_path(fs_fd, temp),
        blob_id=layer_hex,
        blob_meta=proc_path(meta_fd, meta_name),
        toc=proc_path(fs_fd, layout.TOC_FILE),
        codec=result.codec,
        blob_data_size=result.footer.payload_end,
    )
    try:
        async with builder_slots:
            try:
                await run_builder(argv, (fs_fd, meta_fd), "building bootstrap")
            except BuilderFailed as exc:
                if builder.rejected_for_good(exc):
                    unlink_quietly(fs_fd, layout.TOC_FILE)  # an input for a bootstrap that will never exist
                    raise NotConvertible(
                        f"unsupported eStargz layer: {builder.name} rejected its TOC: {exc.last_line}"
                    ) from None
                raise
        if lstat_at(fs_fd, temp) is None:
            raise ConversionError(f"building bootstrap: {builder.name} wrote no bootstrap")
        await trio.to_thread.run_sync(publish, fs_fd, temp, layout.bootstrap_name(layer_hex), layout.OUTPUT_MODE)
    finally:
        unlink_quietly(fs_fd, temp)


async def convert_layer(
    job: LayerJob,
    *,
    client: RegistryClient,
    credentials: CredentialCache,
    builder: Builder,
    builder_slots: trio.CapacityLimiter,
) -> bool:
    """Produce `<hex>` in the snapshot's fs dir; False when it already existed.

    Raises NotConvertible (not eStargz / not for this builder), ConversionError, or OSError
    for a problem of the snapshot's own directories (writing the TOC, publishing). Anything
    that blocks (credential helpers, TOC parsing, writing + fsyncing a TOC of up to 150 MiB)
    runs in a worker thread: this runs on the daemon's event loop, which keeps serving.
    """
    existing = lstat_at(job.fs_fd, layout.bootstrap_name(job.candidate.layer_hex))
    if existing is not None:
        if stat.S_ISREG(existing.st_mode):
            return False
        raise ConversionError(f"{job.candidate.layer_hex} exists but is not a regular file")
    result = await fetch_layer_toc(job.candidate, client=client, credentials=credentials)
    if not builder.converts(result.codec):
        raise NotConvertible(
            f"unsupported eStargz layer: {builder.name} converts gzip eStargz only, not {result.codec.name}"
        )
    await build_layer(job, result, builder=builder, builder_slots=builder_slots)
    return True


def copy_layer_outputs(src_fs_fd: int, dst_fs_fd: int, layer_hex: str, *, with_blob_meta: bool) -> bool:
    """Give another snapshot of the same layer digest the outputs one conversion produced.

    Blocking (reflink or copy + fsync): call in a worker thread. The TOC (and with fscache the
    fs-dir `<hex>.blob.meta`) come first, the bootstrap last, since `<hex>` present means done.
    False when the destination already had its bootstrap; NotRegularFile when the source
    lacks a regular bootstrap or TOC.
    """
    names = layout.layer_output_names(layer_hex, with_blob_meta=False)
    meta = layout.blob_meta_name(layer_hex)
    if with_blob_meta and is_regular_at(src_fs_fd, meta):
        names = layout.layer_output_names(layer_hex, with_blob_meta=True)
    for name in names:
        if not is_regular_at(src_fs_fd, name):
            raise NotRegularFile(name)
    copy = functools.partial(copy_file_at, mode=layout.OUTPUT_MODE)
    for name in names[:-1]:
        existing = lstat_at(dst_fs_fd, name)
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            unlink_quietly(dst_fs_fd, name)  # ours to produce; never write through a planted link
        if existing is None or not stat.S_ISREG(existing.st_mode):
            copy(src_fs_fd, name, dst_fs_fd, name, temp=layout.merge_temp_name())
    return copy(src_fs_fd, names[-1], dst_fs_fd, names[-1], temp=layout.merge_temp_name())


class LayerConverter:
    """`<hex>` in a candidate's fs dir on demand: one conversion per layer digest, then copies."""

    def __init__(
        self,
        *,
        dirs: RootDirs,
        table: LiveTable,
        gate: ConversionGate,
        recorder: StateRecorder,
        builder: Builder,
        builder_slots: trio.CapacityLimiter,
        registry: Callable[[], Awaitable[RegistryClient]],
        credentials: CredentialCache,
        changed: Changed,
    ) -> None:
        self.dirs = dirs
        self.table = table
        self.gate = gate
        self.recorder = recorder
        self.builder = builder
        self.builder_slots = builder_slots
        self.registry = registry
        self.credentials = credentials
        self.changed = changed
        self.conversions = 0
        self._sources: dict[str, str] = {}  # layer hex -> a snapshot id whose fs dir has its outputs

    @staticmethod
    def key(candidate: LayerCandidate) -> Hashable:
        """What single-flight, backoff and the "not eStargz" memory are kept per."""
        return candidate.layer_hex

    def refusal(self, candidate: LayerCandidate) -> str | None:
        return self.gate.refusal(self.key(candidate))

    def outputs(self, layer_hex: str) -> list[str]:
        return layout.layer_output_names(layer_hex, with_blob_meta=self.dirs.fscache)

    async def ensure(self, candidate: LayerCandidate) -> None:
        """`<hex>` in the candidate's fs dir, or OSError ENOENT (not eStargz) / EIO (failed)."""
        key = self.key(candidate)
        await self.gate.run(key, lambda: self._provide(candidate, key))

    async def _provide(self, candidate: LayerCandidate, key: Hashable) -> None:
        try:
            fs_fd = self.dirs.open_fs(candidate.snapshot_id)
        except OSError as exc:
            raise await self._local_failure(candidate, f"fs dir is not usable: {exc.strerror}") from None
        try:
            existing = lstat_at(fs_fd, layout.bootstrap_name(candidate.layer_hex))
            if existing is not None:
                if stat.S_ISREG(existing.st_mode):
                    return
                raise await self._local_failure(candidate, f"{candidate.layer_hex} exists but is not a regular file")
            if not await self._copy_from_sibling(candidate, fs_fd):
                await self._convert(candidate, fs_fd, key)
        finally:
            os.close(fs_fd)

    async def _local_failure(self, candidate: LayerCandidate, detail: str) -> OSError:
        """A problem of one snapshot's dir, not of the layer: EIO without a digest-wide backoff."""
        message = f"snapshot {candidate.snapshot_id}: {detail}"
        log.error("%s", message)
        await self.recorder.layer(candidate.layer_hex, status="error", error=message, snapshot_id=candidate.snapshot_id)
        return OSError(errno.EIO, message)

    # ------------------------------------------------------------------ copies
    def _sibling_sources(self, candidate: LayerCandidate) -> list[str]:
        """Other candidate snapshots of the same layer digest, the last known source first."""
        known = self._sources.get(candidate.layer_hex)
        ids = [known] if known is not None and known != candidate.snapshot_id else []
        for snapshot in self.table.cached().all():
            other = snapshot.candidate
            if (other is not None and other.snapshot_id != candidate.snapshot_id
                    and other.snapshot_id not in ids and self.key(other) == self.key(candidate)):
                ids.append(other.snapshot_id)
        return ids

    def _copy_from_first(self, source_ids: Sequence[str], dst_fd: int, layer_hex: str) -> str | None:
        """Copy the outputs from the first source that has them (blocking: runs in a thread)."""
        for source_id in source_ids:
            try:
                src_fd = self.dirs.open_fs(source_id)
            except OSError:
                continue
            try:
                copy_layer_outputs(src_fd, dst_fd, layer_hex, with_blob_meta=self.dirs.fscache)
                return source_id
            except (NotRegularFile, FileNotFoundError):
                continue  # that snapshot has no complete outputs (yet, or any more)
            finally:
                os.close(src_fd)
        return None

    async def _copy_from_sibling(self, candidate: LayerCandidate, fs_fd: int) -> bool:
        """Outputs copied from another snapshot of the same digest: no TOC fetch, no builder."""
        layer_hex = candidate.layer_hex
        sources = self._sibling_sources(candidate)
        if not sources:
            return False
        try:
            source_id = await trio.to_thread.run_sync(self._copy_from_first, sources, fs_fd, layer_hex)
        except OSError as exc:
            detail = f"copying layer {layer_hex[:12]} failed: {exc.strerror}"
            raise await self._local_failure(candidate, detail) from None
        if source_id is None:
            return False
        self._sources[layer_hex] = source_id
        log.info("snapshot %s: copied layer %s from snapshot %s", candidate.snapshot_id, layer_hex[:12], source_id)
        self.changed(candidate.snapshot_id, *self.outputs(layer_hex))
        await self.recorder.layer(layer_hex, status="converted", snapshot_id=candidate.snapshot_id)
        return True

    # ------------------------------------------------------------------ conversion
    async def _convert(self, candidate: LayerCandidate, fs_fd: int, key: Hashable) -> None:
        layer_hex, snapshot_id = candidate.layer_hex, candidate.snapshot_id
        started = time.monotonic()
        try:
            job = LayerJob(candidate, fs_fd, self.dirs.blob_meta_dir(fs_fd))
            created = await convert_layer(
                job, client=await self.registry(), credentials=self.credentials, builder=self.builder,
                builder_slots=self.builder_slots,
            )
        except NotConvertible as exc:
            reason = str(exc)
            self.gate.refuse(key, reason)
            log.info("snapshot %s layer %s: %s", snapshot_id, layer_hex[:12], reason)
            await self.recorder.layer(layer_hex, status="not-estargz", error=reason, snapshot_id=snapshot_id)
            raise OSError(errno.ENOENT, reason) from None
        except OSError as exc:  # this snapshot's dir, not the layer: no digest-wide backoff
            detail = f"layer sha256:{layer_hex}: writing outputs: {exc.strerror or exc}"
            raise await self._local_failure(candidate, detail) from None
        except StargzfsError as exc:
            detail = str(exc)
            # registry errors already name the blob: the digest appears once in the message
            prefix = f"snapshot {snapshot_id}" if layer_hex in detail else f"snapshot {snapshot_id} layer sha256:{layer_hex}"
            message = f"{prefix}: {detail}"
            delay = self.gate.failed(key, message)
            log.error("%s (retry in %.1fs)", message, delay)
            await self.recorder.layer(layer_hex, status="error", error=message, snapshot_id=snapshot_id)
            raise OSError(errno.EIO, message) from None
        self.gate.succeeded(key)
        self._sources[layer_hex] = snapshot_id
        if created:
            self.conversions += 1
            self.changed(snapshot_id, *self.outputs(layer_hex))
            log.info("snapshot %s: converted layer %s in %.2fs", snapshot_id, layer_hex[:12], time.monotonic() - started)
            await self.recorder.layer(layer_hex, status="converted", snapshot_id=snapshot_id)


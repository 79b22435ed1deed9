"""One layer: detect -> TOC -> `stargz.index.json` -> builder -> `<hex>` in its snapshot's fs dir.

A layer is converted once per `LayerKey`: its digest and where its TOC comes from (the
snapshot's toc.digest label, else its registry repository), because a digest alone proves
nothing about the TOC a registry serves for it: two images naming one digest with different
TOCs must never get each other's bootstrap. Other snapshots with the same key get copies of
the outputs (reflink where the filesystem can) instead of a second fetch and build. Outputs
appear atomically (temp + rename without replacing, `<hex>` last since it means "done")
and are 0440 before they become visible; a blob.meta another TOC built is never replaced.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import trio

from stargzfs import metrics
from stargzfs.conversion.builder import MALFORMED_STATUS, Builder, BuilderFailed, run_builder
from stargzfs.conversion.context import Converter, MountContext
from stargzfs.conversion.errors import ConversionError, NotConvertible
from stargzfs.conversion.gate import ConversionGate
from stargzfs.errors import NotEstargzError, StargzfsError, UnsupportedError, UsageError
from stargzfs.estargz.fetch import TocResult, fetch_toc
from stargzfs.fdpath import NotRegularFile, copy_file_at, is_regular_at, lstat_at, open_dir_beneath, proc_path
from stargzfs.fdpath import publish, remove_flat_dir, rename_noreplace, same_contents, sha256_at, unlink_quietly, write_file_at
from stargzfs.registry import CredentialCache, Credentials, RegistryClient, parse_reference
from stargzfs.snapshots import layout
from stargzfs.snapshots.store import LayerCandidate

log = logging.getLogger(__name__)


class LayerKey(NamedTuple):
    """What one conversion is shared by: single flight, backoff, refusals and copies."""

    layer_hex: str
    source: str  # "toc sha256:..." (the label), else "repo <registry>/<repository>"


def layer_key(candidate: LayerCandidate) -> LayerKey:
    if candidate.toc_digest:
        return LayerKey(candidate.layer_hex, f"toc {candidate.toc_digest}")
    try:
        return LayerKey(candidate.layer_hex, f"repo {parse_reference(candidate.image_ref).name}")
    except UsageError:
        return LayerKey(candidate.layer_hex, f"ref {candidate.image_ref}")


@dataclass(frozen=True)
class LayerJob:
    """Where one layer's outputs go (the dir fds are owned by the caller)."""

    candidate: LayerCandidate
    fs_fd: int
    blob_meta_fd: int  # cache dir (fusedev) or the fs dir (fscache)
    index_fd: int = -1  # lazy serving's cache dir, for the bundled builder's blob index (-1: none)


@metrics.timed("toc_fetch")
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


@metrics.timed("build")
async def build_layer(job: LayerJob, result: TocResult, *, builder: Builder, builder_slots: trio.CapacityLimiter) -> None:
    """Write the TOC, run the builder on it, publish blob.meta then `<hex>` (OSError: this snapshot's dirs).

    The builder writes blob.meta into a private temp dir beside its final place, under the
    name nydus-snapshotter gives it, so an existing blob.meta is only ever kept or matched.
    """
    layer_hex = job.candidate.layer_hex
    fs_fd, meta_fd = job.fs_fd, job.blob_meta_fd
    await trio.to_thread.run_sync(functools.partial(
        write_file_at, fs_fd, layout.TOC_FILE, result.raw, mode=layout.OUTPUT_MODE,
        temp=layout.convert_temp_name("-file-"),
    ))
    meta_name, index_name = layout.blob_meta_name(layer_hex), layout.blob_index_name(layer_hex)
    temp = layout.convert_temp_name()
    meta_dir = layout.convert_temp_name("-meta-")
    os.mkdir(meta_dir, 0o700, dir_fd=meta_fd)
    meta_dir_fd = open_dir_beneath(meta_fd, [meta_dir])
    try:
        argv = builder.create_argv(
            bootstrap=proc_path(fs_fd, temp),
            blob_id=layer_hex,
            blob_meta=proc_path(meta_dir_fd, meta_name),
            toc=proc_path(fs_fd, layout.TOC_FILE),
            codec=result.codec,
            blob_data_size=result.footer.payload_end,
            blob_index=proc_path(meta_dir_fd, index_name) if job.index_fd >= 0 else None,
        )
        await _run_create(builder, builder_slots, argv, (fs_fd, meta_dir_fd), job)
        if lstat_at(fs_fd, temp) is None:
            raise ConversionError(f"building bootstrap: {builder.name} wrote no bootstrap")
        if lstat_at(meta_dir_fd, meta_name) is not None:
            await trio.to_thread.run_sync(_publish_blob_meta, meta_dir_fd, meta_fd, meta_name)
            if job.index_fd >= 0 and lstat_at(meta_dir_fd, index_name) is not None:
                # never replacing: one there already is checked against blob.meta when the
                # blob is opened, and one made for another blob.meta takes its cache with it
                try:
                    rename_noreplace(meta_dir_fd, index_name, job.index_fd, index_name)
                except OSError as exc:  # the index is an optimisation: the first open makes one
                    log.debug("layer %s: blob index left to the first open: %s", layer_hex[:12], exc.strerror)
        await trio.to_thread.run_sync(publish, fs_fd, temp, layout.bootstrap_name(layer_hex), layout.OUTPUT_MODE)
    finally:
        unlink_quietly(fs_fd, temp)
        os.close(meta_dir_fd)
        # with whatever a killed builder left in it (an atomicio temp): never an error that
        # would hide the conversion's own outcome; the start-up sweep retries what stays
        remove_flat_dir(meta_fd, meta_dir)


async def _run_create(
    builder: Builder, builder_slots: trio.CapacityLimiter, argv: list[str], fds: tuple[int, ...], job: LayerJob
) -> None:
    async with builder_slots:
        try:
            await run_builder(builder, argv, fds, "building bootstrap")
        except BuilderFailed as exc:
            if builder.rejected_for_good(exc):
                unlink_quietly(job.fs_fd, layout.TOC_FILE)  # an input for a bootstrap that will never exist
                if exc.status == MALFORMED_STATUS:  # a broken TOC is an error, not "no bootstrap"
                    raise NotConvertible(
                        f"malformed eStargz layer: {builder.name} rejected its TOC: {exc.last_line}", errno.EIO
                    ) from None
                raise NotConvertible(
                    f"unsupported eStargz layer: {builder.name} rejected its TOC: {exc.last_line}"
                ) from None
            raise


def _publish_blob_meta(temp_dir_fd: int, meta_fd: int, meta_name: str) -> None:
    """Move the new blob.meta into place; one already there must hold the same bytes.

    The fusedev cache dir keeps one `<hex>.blob.meta` per layer digest for every image that
    names it (nydusd finds it by blob id): different bytes mean another TOC for the same
    digest, and replacing them would change that other image's filesystem.
    """
    while not publish(temp_dir_fd, meta_name, meta_name, layout.OUTPUT_MODE, final_dir_fd=meta_fd, keep_temp=True):
        existing = lstat_at(meta_fd, meta_name)
        if existing is None:
            continue  # removed meanwhile: try again
        if not stat.S_ISREG(existing.st_mode):
            unlink_quietly(meta_fd, meta_name)  # ours to produce; never write through a planted link
            continue
        if same_contents(temp_dir_fd, meta_name, meta_fd, meta_name):
            return
        raise ConversionError(
            f"{meta_name} already exists with the chunk map of another TOC for this digest "
            "(another image names the same layer digest with a different TOC); not replacing it"
        )


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


class LayerConverter(Converter):
    """`<hex>` in a candidate's fs dir on demand: one conversion per layer digest, then copies."""

    def __init__(
        self,
        context: MountContext,
        gate: ConversionGate,
        *,
        registry: Callable[[], Awaitable[RegistryClient]],
        credentials: CredentialCache,
        on_bootstrap: Callable[[LayerCandidate], None] = lambda candidate: None,
    ) -> None:
        super().__init__(context, gate)
        self.registry = registry
        self.credentials = credentials
        self.on_bootstrap = on_bootstrap  # told whenever a candidate's bootstrap exists
        self.conversions = 0
        self._sources: dict[LayerKey, str] = {}  # key -> a snapshot id whose fs dir has its outputs
        self._checked: set[tuple[str, str]] = set()  # (snapshot id, toc digest) whose TOC file matched

    @staticmethod
    def key(candidate: LayerCandidate) -> LayerKey:
        """What single-flight, backoff, the "not eStargz" memory and copies are kept per."""
        return layer_key(candidate)

    def refusal(self, candidate: LayerCandidate) -> tuple[int, str] | None:
        """(errno, why) when the candidate's layer will never convert."""
        return self.gate.refusal(self.key(candidate))

    def outputs(self, layer_hex: str) -> list[str]:
        return layout.layer_output_names(layer_hex, with_blob_meta=self.dirs.fscache)

    async def ensure(self, candidate: LayerCandidate) -> None:
        """`<hex>` in the candidate's fs dir, or OSError ENOENT (not eStargz) / EIO (failed)."""
        key = self.key(candidate)
        await self.gate.run(key, lambda: self._guarded(candidate, key))

    async def _guarded(self, candidate: LayerCandidate, key: LayerKey) -> None:
        """`_provide`, with anything but an OSError answer treated like any failed conversion.

        A bug, or an input nobody foresaw, must still end as EIO, a recorded error and a
        backoff: never a refetch per lookup, never an exception escaping into the FUSE layer.
        """
        try:
            await self._provide(candidate, key)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.exception("snapshot %s layer %s: unexpected failure", candidate.snapshot_id, candidate.layer_hex[:12])
            raise await self._failed(candidate, key, f"unexpected {type(exc).__name__}: {exc}") from None

    async def _provide(self, candidate: LayerCandidate, key: LayerKey) -> None:
        try:
            fs_fd = self.dirs.open_fs(candidate.snapshot_id)
        except OSError as exc:
            raise await self._local_failure(candidate, f"fs dir is not usable: {exc.strerror}") from None
        try:
            existing = lstat_at(fs_fd, layout.bootstrap_name(candidate.layer_hex))
            if existing is not None:
                if stat.S_ISREG(existing.st_mode):
                    await self._check_built_from_label(candidate, fs_fd)
                    self.on_bootstrap(candidate)
                    return
                raise await self._local_failure(candidate, f"{candidate.layer_hex} exists but is not a regular file")
            if not await self._copy_from_sibling(candidate, fs_fd):
                await self._convert(candidate, fs_fd, key)
            self.on_bootstrap(candidate)
        finally:
            os.close(fs_fd)

    async def _check_built_from_label(self, candidate: LayerCandidate, fs_fd: int) -> None:
        """An existing bootstrap must come from the TOC the label names (checked once per mount).

        The TOC file beside a bootstrap is what built it, so a bootstrap left by an earlier
        run from another image's TOC is caught after a restart too.
        """
        label = candidate.toc_digest
        if label is None or (candidate.snapshot_id, label) in self._checked:
            return
        try:
            found = await trio.to_thread.run_sync(sha256_at, fs_fd, layout.TOC_FILE)
        except OSError as exc:
            raise await self._local_failure(candidate, f"cannot read {layout.TOC_FILE}: {exc.strerror}") from None
        if found is not None and found != label:
            detail = (
                f"bootstrap {candidate.layer_hex} was built from TOC {found}, but the snapshot's toc.digest label "
                f"says {label}; remove {candidate.layer_hex} and {layout.TOC_FILE} to rebuild it"
            )
            raise await self._local_failure(candidate, detail)
        self._checked.add((candidate.snapshot_id, label))

    async def _local_failure(self, candidate: LayerCandidate, detail: str) -> OSError:
        """A problem of one snapshot's dir, not of the layer: EIO without a digest-wide backoff."""
        message = f"snapshot {candidate.snapshot_id}: {detail}"
        log.error("%s", message)
        await self.recorder.layer(candidate.layer_hex, status="error", error=message, snapshot_id=candidate.snapshot_id)
        return OSError(errno.EIO, message)

    # ------------------------------------------------------------------ copies
    def _sibling_sources(self, candidate: LayerCandidate) -> list[str]:
        """Other candidate snapshots with the same key, the last known source first."""
        known = self._sources.get(self.key(candidate))
        ids = [known] if known is not None and known != candidate.snapshot_id else []
        for snapshot in self.table.cached().all():
            other = snapshot.candidate
            if (other is not None and other.snapshot_id != candidate.snapshot_id
                    and other.snapshot_id not in ids and self.key(other) == self.key(candidate)):
                ids.append(other.snapshot_id)
        return ids

    def _copy_from_first(self, source_ids: Sequence[str], dst_fd: int, candidate: LayerCandidate) -> str | None:
        """Copy the outputs from the first source that has them (blocking: runs in a thread).

        With a toc.digest label, a source whose TOC file hashes to anything else is skipped.
        """
        for source_id in source_ids:
            try:
                src_fd = self.dirs.open_fs(source_id)
            except OSError:
                continue
            try:
                if candidate.toc_digest is not None and sha256_at(src_fd, layout.TOC_FILE) != candidate.toc_digest:
                    continue
                copy_layer_outputs(src_fd, dst_fd, candidate.layer_hex, with_blob_meta=self.dirs.fscache)
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
            source_id = await trio.to_thread.run_sync(self._copy_from_first, sources, fs_fd, candidate)
        except OSError as exc:
            detail = f"copying layer {layer_hex[:12]} failed: {exc.strerror}"
            raise await self._local_failure(candidate, detail) from None
        if source_id is None:
            return False
        self._sources[self.key(candidate)] = source_id
        log.info("snapshot %s: copied layer %s from snapshot %s", candidate.snapshot_id, layer_hex[:12], source_id)
        self.changed(candidate.snapshot_id, *self.outputs(layer_hex))
        await self.recorder.layer(layer_hex, status="converted", snapshot_id=candidate.snapshot_id)
        return True

    # ------------------------------------------------------------------ conversion
    @staticmethod
    def _message(candidate: LayerCandidate, detail: str) -> str:
        """Errors name the snapshot and the layer digest once (registry errors already name the blob)."""
        if candidate.layer_hex in detail:
            return f"snapshot {candidate.snapshot_id}: {detail}"
        return f"snapshot {candidate.snapshot_id} layer sha256:{candidate.layer_hex}: {detail}"

    async def _failed(self, candidate: LayerCandidate, key: LayerKey, detail: str) -> OSError:
        """A failed conversion: recorded, backed off for its key, EIO."""
        metrics.CONVERSIONS.labels("error").inc()
        message = self._message(candidate, detail)
        delay = self.gate.failed(key, message)
        log.error("%s (retry in %.1fs)", message, delay)
        await self.recorder.layer(candidate.layer_hex, status="error", error=message, snapshot_id=candidate.snapshot_id)
        return OSError(errno.EIO, message)

    async def _convert(self, candidate: LayerCandidate, fs_fd: int, key: LayerKey) -> None:
        layer_hex, snapshot_id = candidate.layer_hex, candidate.snapshot_id
        started = time.monotonic()
        try:
            # the bundled builder also writes the blob's index for lazy serving (one TOC parse,
            # no second builder run when `.blobs/<hex>` is first opened); with fscache the
            # conversion leaves the cache dir (nydusd's) alone, and the first open makes it
            fusedev_bundled = self.builder.flavour == "stargzfs" and not self.dirs.fscache
            index_fd = self.dirs.cache_fd if fusedev_bundled else -1
            job = LayerJob(candidate, fs_fd, self.dirs.blob_meta_dir(fs_fd), index_fd)
            created = await convert_layer(
                job, client=await self.registry(), credentials=self.credentials, builder=self.builder,
                builder_slots=self.builder_slots,
            )
        except NotConvertible as exc:
            reason = self._message(candidate, str(exc)) if exc.code != errno.ENOENT else str(exc)
            metrics.CONVERSIONS.labels("not_estargz" if exc.code == errno.ENOENT else "error").inc()
            self.gate.refuse(key, reason, exc.code)
            log.info("snapshot %s layer %s: %s", snapshot_id, layer_hex[:12], reason)
            status = "not-estargz" if exc.code == errno.ENOENT else "error"
            await self.recorder.layer(layer_hex, status=status, error=reason, snapshot_id=snapshot_id)
            raise OSError(exc.code, reason) from None
        except OSError as exc:  # this snapshot's dir, not the layer: no digest-wide backoff
            metrics.CONVERSIONS.labels("error").inc()
            detail = f"layer sha256:{layer_hex}: writing outputs: {exc.strerror or exc}"
            raise await self._local_failure(candidate, detail) from None
        except StargzfsError as exc:
            raise await self._failed(candidate, key, str(exc)) from None
        self.gate.succeeded(key)
        self._sources[key] = snapshot_id
        if created:
            metrics.CONVERSIONS.labels("converted").inc()
            self.conversions += 1
            self.changed(snapshot_id, *self.outputs(layer_hex))
            log.info("snapshot %s: converted layer %s in %.2fs", snapshot_id, layer_hex[:12], time.monotonic() - started)
            await self.recorder.layer(layer_hex, status="converted", snapshot_id=snapshot_id,
                                      seconds=time.monotonic() - started, toc_bytes=getattr(lstat_at(fs_fd, layout.TOC_FILE), "st_size", None))


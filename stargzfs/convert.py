"""One layer's lazy conversion: detect -> TOC -> stargz.index.json -> builder -> `<hex>`.

Also owns the builder: the bundled `stargzfs-image` or an external nydus-image whose CLI
generation is detected once from `--version` (v2.1.x takes `--blob-meta`; v2.2+ rejects it
and needs `--blob-data-size`, spec snapshotter §7).

Every file operation is relative to a directory fd opened without following symlinks, and
the builder gets `/proc/self/fd/<N>/<name>` paths for inherited dir fds: a symlink planted
in place of an fs dir, or a rename of it while the builder runs, can never send a write
outside ROOT. Outputs appear atomically (temp `converting-stargz*` + rename without
replacing) and are chmod 0440 before they become visible.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from stargzfs.errors import FormatError, NotEstargzError, StargzfsError, UnsupportedError, UsageError
from stargzfs.estargz.fetch import fetch_toc
from stargzfs.estargz.toc import TOC_NAME
from stargzfs.fdpath import is_regular_at, listdir_at, lstat_at, proc_path, rename_noreplace, unlink_quietly
from stargzfs.registry import RegistryClient, parse_reference
from stargzfs.registry.auth import CredentialCache
from stargzfs.snapshots.store import Snapshot

log = logging.getLogger(__name__)

CONVERT_TEMP_PREFIX = "converting-stargz"
MERGE_TEMP_PREFIX = "merging-stargz"
CHUNK_SIZE = "0x400000"
OUTPUT_MODE = 0o440
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_MAX_ERROR_OUTPUT = 400


class NotConvertible(StargzfsError):
    """The layer is a valid layer but not one this mount can turn into a bootstrap (ENOENT)."""


class ConversionError(StargzfsError):
    """Conversion failed for a reason worth retrying later (EIO)."""


class BuilderFailed(ConversionError):
    """The builder exited non-zero; `status` and `last_line` say how (see run_builder)."""

    def __init__(self, message: str, *, status: int, last_line: str) -> None:
        super().__init__(message)
        self.status = status
        self.last_line = last_line


# stargzfs-image's documented exit codes (stargzfs/errors.py) for input it will never accept:
# retrying the same TOC cannot help, so these mean "not convertible", not "try again".
_PERMANENT_BUILDER_STATUSES = (FormatError.exit_code, UnsupportedError.exit_code)


# ----------------------------------------------------------------------------- builder
@dataclass(frozen=True)
class Builder:
    """How to run the nydus-image compatible builder.

    flavour: "stargzfs" (bundled, v2.1 CLI + `--compressor`), "v2.1" or "v2.2+" (external).
    """

    command: tuple[str, ...]
    flavour: str
    version: str

    @property
    def name(self) -> str:
        return "stargzfs-image" if self.flavour == "stargzfs" else f"nydus-image {self.version}"

    @property
    def supports_zstd(self) -> bool:
        return self.flavour == "stargzfs"

    def create_argv(
        self, *, bootstrap: str, blob_id: str, blob_meta: str, toc: str, compression: str, blob_data_size: int
    ) -> list[str]:
        """The seed's exact argv (snapshotter §7), adapted to the builder's CLI generation."""
        argv = [
            *self.command, "create", "--source-type", "stargz_index", "--bootstrap", bootstrap,
            "--blob-id", blob_id, "--repeatable", "--disable-check", "--fs-version", "6",
            "--chunk-size", CHUNK_SIZE,
        ]
        if self.flavour == "v2.2+":
            argv += ["--blob-data-size", f"0x{blob_data_size:x}"]
        else:
            argv += ["--blob-meta", blob_meta]
        if self.flavour == "stargzfs" and compression != "gzip":
            argv += ["--compressor", compression]
        return [*argv, toc]

    def merge_argv(self, *, bootstrap: str, sources: Sequence[str]) -> list[str]:
        return [*self.command, "merge", "--bootstrap", bootstrap, *sources]


def bundled_builder() -> Builder:
    """The venv's console script next to this interpreter, else `python -m stargzfs.image_cli`."""
    script = Path(sys.executable).parent / "stargzfs-image"
    if script.is_file() and os.access(script, os.X_OK):
        return Builder((str(script),), "stargzfs", "bundled")
    return Builder((sys.executable, "-m", "stargzfs.image_cli"), "stargzfs", "bundled")


def detect_builder(nydus_image: Path | None) -> Builder:
    """Resolve the configured builder and its CLI generation; UsageError if unusable."""
    if nydus_image is None:
        return bundled_builder()
    text = str(nydus_image)
    found = shutil.which(text) if "/" not in text else (text if os.access(text, os.X_OK) else None)
    if found is None:
        raise UsageError(f"nydus-image {text!r} is not an executable file (or not on PATH)")
    found = os.path.abspath(found)  # the daemon runs with cwd "/"
    try:
        done = subprocess.run(
            [found, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"cannot run {found} --version: {exc}") from None
    match = _VERSION.search(done.stdout + "\n" + done.stderr)
    if done.returncode != 0 or match is None:
        raise UsageError(f"{found} --version did not report a version (exit {done.returncode})")
    major, minor, patch = (int(part) for part in match.groups())
    version = f"v{major}.{minor}.{patch}"
    if (major, minor) == (2, 1):
        flavour = "v2.1"
    elif (major, minor) >= (2, 2):
        flavour = "v2.2+"
    else:
        raise UsageError(f"{found} is nydus-image {version}; stargz_index conversion needs v2.1 or later")
    log.info("builder: %s (%s CLI)", found, flavour)
    return Builder((found,), flavour, version)


def _death_signal_prefix() -> tuple[str, ...]:
    """`setpriv --pdeathsig KILL`: a builder must not outlive a killed daemon and write late temps."""
    setpriv = shutil.which("setpriv")
    return (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()


_PREFIX = _death_signal_prefix()


async def run_builder(argv: Sequence[str], pass_fds: Sequence[int], what: str) -> None:
    """Run one builder process; ConversionError with its last output line on failure.

    Popen runs in the trio thread on purpose: PR_SET_PDEATHSIG fires when the *thread*
    that forked exits, and trio's worker threads come and go.
    """
    log.debug("running %s", " ".join(argv))
    try:
        process = subprocess.Popen(
            [*_PREFIX, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            pass_fds=tuple(pass_fds), close_fds=True,
        )
    except OSError as exc:
        raise ConversionError(f"{what}: cannot start {argv[0]}: {exc.strerror}") from None
    try:
        output, _ = await trio.to_thread.run_sync(process.communicate, abandon_on_cancel=True)
    except BaseException:
        process.kill()
        raise
    if process.returncode != 0:
        lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
        last = lines[-1].strip()[:_MAX_ERROR_OUTPUT] if lines else "(no output)"
        raise BuilderFailed(
            f"{what}: {Path(argv[0]).name} exited with status {process.returncode}: {last}",
            status=process.returncode, last_line=last,
        )
    if output.strip():
        log.debug("%s output: %s", what, output.decode("utf-8", "replace").strip()[:2000])


# ----------------------------------------------------------------------------- fd helpers


def publish(dir_fd: int, temp: str, final: str) -> bool:
    """chmod 0440 the regular file `temp`, then move it to `final` unless that exists.

    Returns False when `final` already existed (the temp is removed; the existing output wins).
    """
    fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConversionError(f"builder output {temp} is not a regular file")
        os.fchmod(fd, OUTPUT_MODE)
        os.fsync(fd)
    finally:
        os.close(fd)
    if rename_noreplace(dir_fd, temp, dir_fd, final):
        return True
    unlink_quietly(dir_fd, temp)
    return False


def write_file_at(dir_fd: int, name: str, data: bytes, mode: int = OUTPUT_MODE) -> None:
    """Replace `name` atomically with `data` (temp `converting-stargz*` beside it)."""
    temp = f"{CONVERT_TEMP_PREFIX}-file-{secrets.token_hex(6)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        unlink_quietly(dir_fd, temp)
        raise


def copy_file_at(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> bool:
    """Copy a regular file (reflink, else copy_file_range) to `dst` via a temp; False if `dst` exists."""
    src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir_fd)
    temp = f"{MERGE_TEMP_PREFIX}{secrets.token_hex(6)}"
    try:
        if not stat.S_ISREG(os.fstat(src_fd).st_mode):
            raise ConversionError(f"{src} is not a regular file")
        out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dst_dir_fd)
        try:
            _clone_or_copy(src_fd, out)
            os.fsync(out)
        finally:
            os.close(out)
        return publish(dst_dir_fd, temp, dst)
    finally:
        os.close(src_fd)
        unlink_quietly(dst_dir_fd, temp)


_FICLONE = 0x40049409


def _clone_or_copy(src_fd: int, dst_fd: int) -> None:
    import fcntl

    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return
    except OSError:
        pass
    size = os.fstat(src_fd).st_size
    offset = 0
    try:
        while offset < size:
            copied = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
            if copied == 0:
                break
            offset += copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while offset < size:
        chunk = os.pread(src_fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        os.pwrite(dst_fd, chunk, offset)
        offset += len(chunk)


# ----------------------------------------------------------------------------- conversion
@dataclass(frozen=True)
class ConversionPlan:
    """Where one layer's outputs go (all dir fds are owned by the caller)."""

    snapshot: Snapshot
    fs_dir_fd: int
    blob_meta_dir_fd: int  # cache dir (fusedev) or fs dir (fscache)


async def convert_layer(
    plan: ConversionPlan,
    *,
    client: RegistryClient,
    credentials: CredentialCache,
    builder: Builder,
    builder_slots: trio.CapacityLimiter,
) -> bool:
    """Produce `<hex>` in the snapshot's fs dir; False when it already existed.

    Raises NotConvertible (not eStargz / not for this builder), ConversionError, or OSError
    for a problem of the snapshot's own directories (writing the TOC, publishing). Anything
    that blocks (credential helpers, writing + fsyncing a TOC of up to 150 MiB) runs in a
    worker thread: this runs on the daemon's event loop, which must keep serving meanwhile.
    """
    snapshot = plan.snapshot
    layer_hex = snapshot.layer_hex
    image_ref = snapshot.image_ref
    if layer_hex is None or image_ref is None:
        raise NotConvertible("not convertible: no usable layer labels")
    fs_fd = plan.fs_dir_fd
    existing = lstat_at(fs_fd, layer_hex)
    if existing is not None:
        if stat.S_ISREG(existing.st_mode):
            return False
        raise ConversionError(f"{layer_hex} exists but is not a regular file")

    digest = f"sha256:{layer_hex}"
    try:
        reference = parse_reference(image_ref)
        found = await credentials.resolve(reference, snapshot.labels)
        blob = client.blob(reference, digest, credentials=found, resolved=True)
        # decoding + parsing a TOC of up to 150 MiB takes seconds: not on the event loop
        result = await fetch_toc(blob, expected_digest=snapshot.toc_digest, offload=trio.to_thread.run_sync)
    except NotEstargzError as exc:
        raise NotConvertible(str(exc) if str(exc).startswith("not eStargz") else f"not eStargz: {exc}") from None
    except UnsupportedError as exc:
        raise NotConvertible(f"unsupported eStargz layer: {exc}") from None
    except StargzfsError as exc:
        raise ConversionError(f"fetching TOC: {exc}") from None
    except OSError as exc:  # (the steps below raise OSError only for this snapshot's own dirs)
        raise ConversionError(f"fetching TOC: {exc.strerror or exc}") from None
    compression = result.footer.compression
    if compression != "gzip" and not builder.supports_zstd:
        raise NotConvertible(f"unsupported eStargz layer: {builder.name} converts gzip eStargz only, not {compression}")

    await trio.to_thread.run_sync(write_file_at, fs_fd, TOC_NAME, result.raw)
    meta_fd = plan.blob_meta_dir_fd
    meta_name = f"{layer_hex}.blob.meta"
    meta_info = lstat_at(meta_fd, meta_name)
    if meta_info is not None and not stat.S_ISREG(meta_info.st_mode):
        unlink_quietly(meta_fd, meta_name)  # ours to produce; never write through a planted link
    temp = f"{CONVERT_TEMP_PREFIX}{secrets.token_hex(6)}"
    argv = builder.create_argv(
        bootstrap=proc_path(fs_fd, temp),
        blob_id=layer_hex,
        blob_meta=proc_path(meta_fd, meta_name),
        toc=proc_path(fs_fd, TOC_NAME),
        compression=compression,
        blob_data_size=result.footer.payload_end,
    )
    try:
        async with builder_slots:
            try:
                await run_builder(argv, (fs_fd, meta_fd), "building bootstrap")
            except BuilderFailed as exc:
                if builder.flavour == "stargzfs" and exc.status in _PERMANENT_BUILDER_STATUSES:
                    unlink_quietly(fs_fd, TOC_NAME)  # an input for a bootstrap that will never exist
                    raise NotConvertible(f"unsupported eStargz layer: {builder.name} rejected its TOC: {exc.last_line}") from None
                raise
        if lstat_at(fs_fd, temp) is None:
            raise ConversionError(f"building bootstrap: {builder.name} wrote no bootstrap")
        await trio.to_thread.run_sync(publish, fs_fd, temp, layer_hex)
    finally:
        unlink_quietly(fs_fd, temp)
    return True


def copy_layer_outputs(src_fs_fd: int, dst_fs_fd: int, layer_hex: str, *, with_blob_meta: bool) -> bool:
    """Give another snapshot of the same layer digest the outputs one conversion produced.

    Blocking (reflink or copy + fsync): call in a worker thread. The TOC (and with fscache the
    fs-dir `<hex>.blob.meta`) come first, the bootstrap last, since `<hex>` present means done.
    False when the destination already had its bootstrap; ConversionError when the source
    lacks a regular bootstrap or TOC.
    """
    names = [TOC_NAME, layer_hex]
    meta = f"{layer_hex}.blob.meta"
    if with_blob_meta and is_regular_at(src_fs_fd, meta):
        names.insert(1, meta)
    for name in names:
        if not is_regular_at(src_fs_fd, name):
            raise ConversionError(f"no regular {name} to copy from")
    for name in names[:-1]:
        existing = lstat_at(dst_fs_fd, name)
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            unlink_quietly(dst_fs_fd, name)  # ours to produce; never write through a planted link
        if existing is None or not stat.S_ISREG(existing.st_mode):
            copy_file_at(src_fs_fd, name, dst_fs_fd, name)
    return copy_file_at(src_fs_fd, layer_hex, dst_fs_fd, layer_hex)


def temp_name_patterns(name: str) -> bool:
    """Names of in-progress files (ours and the builders'): hidden and removed at start-up."""
    return name.startswith(
        (CONVERT_TEMP_PREFIX, MERGE_TEMP_PREFIX, "." + CONVERT_TEMP_PREFIX, "." + MERGE_TEMP_PREFIX)
    ) or bool(_BLOB_META_TEMP.match(name))


_BLOB_META_TEMP = re.compile(r"^\.[0-9a-f]{64}\.blob\.meta\.tmp-")


def remove_temps(dir_fd: int) -> list[str]:
    """Delete stale temp files in one directory; returns their names."""
    removed = []
    for name in listdir_at(dir_fd):
        if temp_name_patterns(name):
            info = lstat_at(dir_fd, name)
            if info is not None and not stat.S_ISDIR(info.st_mode):
                unlink_quietly(dir_fd, name)
                removed.append(name)
    return removed

"""Real eStargz / zstd:chunked images for tests, made by third-party tools (spec estargz.md Part C).

Layer tars are written with Python `tarfile` (so tests control odd orderings), wrapped in an OCI
layout, imported into a private containerd, converted by `ctr-remote` (the same estargz library
stargz-snapshotter uses) and pushed to a loopback docker-registry. The manifest read back over HTTP
is the ground truth tests compare against.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:  # imported lazily at run time so pytest can assert-rewrite the registry plugin
    from .registry import RegistryProcess

CONTAINERD_BINARY = "containerd"
CTR_BINARY = "ctr-remote"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
COMPRESSIONS = ("gzip", "zstd", "plain")
_CTR_TIMEOUT_S = 300.0
_START_TIMEOUT_S = 20.0
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes; leave room for containerd's ".ttrpc" suffix

KINDS = ("file", "dir", "symlink", "hardlink", "fifo", "char", "block", "whiteout", "opaque")
_DEFAULT_MODES = {
    "file": 0o644, "dir": 0o755, "symlink": 0o777, "hardlink": 0o644, "fifo": 0o644,
    "char": 0o666, "block": 0o660, "whiteout": 0o644, "opaque": 0o644,
}


# --------------------------------------------------------------------------------------------------
# Layer tars


@dataclass
class FileSpec:
    """One entry of a layer tree.

    `path` is relative to the layer root ("etc/hello.txt"; "" or "." is the root dir itself) and is
    written "./"-prefixed like GNU tar; set `raw=True` to write `path` verbatim (e.g. "/abs" or "x/y"
    without prefix). Hardlink targets get the same treatment; symlink targets are always verbatim.
    """

    path: str
    kind: str = "file"  # file|dir|symlink|hardlink|fifo|char|block|whiteout|opaque
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    target: str = ""  # symlink/hardlink target
    xattrs: dict[str, bytes] = field(default_factory=dict)  # user.* etc.
    major: int = 0
    minor: int = 0
    mtime: int = 1_600_000_000
    raw: bool = False
    uname: str = ""
    gname: str = ""


def _archive_name(path: str, raw: bool) -> str:
    if raw:
        return path
    stripped = path.strip("/")
    if stripped in ("", "."):
        return "."
    if stripped.startswith("./"):
        stripped = stripped[2:]
    return f"./{stripped}"


def _whiteout_name(spec: FileSpec) -> str:
    parent, _, base = spec.path.rstrip("/").rpartition("/")
    if not base:
        raise ValueError(f"whiteout needs a file name: {spec.path!r}")
    return _archive_name(f"{parent}/.wh.{base}" if parent else f".wh.{base}", spec.raw)


def _opaque_name(spec: FileSpec) -> str:
    directory = spec.path.strip("/")
    inner = f"{directory}/.wh..wh..opq" if directory not in ("", ".") else ".wh..wh..opq"
    return _archive_name(inner, spec.raw)


def _tarinfo(spec: FileSpec) -> tuple[tarfile.TarInfo, bytes | None]:
    if spec.kind not in KINDS:
        raise ValueError(f"unknown FileSpec kind {spec.kind!r} for {spec.path!r}; expected one of {KINDS}")
    if spec.kind == "whiteout":
        name = _whiteout_name(spec)
    elif spec.kind == "opaque":
        name = _opaque_name(spec)
    else:
        name = _archive_name(spec.path, spec.raw)
    info = tarfile.TarInfo(name)
    info.mode = spec.mode if spec.mode is not None else _DEFAULT_MODES[spec.kind]
    info.uid, info.gid = spec.uid, spec.gid
    info.uname, info.gname = spec.uname, spec.gname
    info.mtime = spec.mtime
    payload: bytes | None = None
    if spec.kind == "file":
        info.type = tarfile.REGTYPE
        info.size = len(spec.data)
        payload = spec.data
    elif spec.kind in ("whiteout", "opaque"):
        info.type = tarfile.REGTYPE
    elif spec.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif spec.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = spec.target
    elif spec.kind == "hardlink":
        info.type = tarfile.LNKTYPE
        info.linkname = _archive_name(spec.target, spec.raw)
    elif spec.kind == "fifo":
        info.type = tarfile.FIFOTYPE
    else:
        info.type = tarfile.CHRTYPE if spec.kind == "char" else tarfile.BLKTYPE
        info.devmajor, info.devminor = spec.major, spec.minor
    if spec.xattrs:
        # surrogateescape lets arbitrary bytes through; tarfile then marks hdrcharset=BINARY.
        info.pax_headers = {
            f"SCHILY.xattr.{key}": value.decode("utf-8", "surrogateescape")
            for key, value in spec.xattrs.items()
        }
    return info, payload


def make_layer_tar(files: Sequence[FileSpec], out: Path) -> Path:
    """Plain PAX tar of `files` in the given order (so a hardlink may precede its target)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(
        tmp, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as archive:
        for spec in files:
            info, payload = _tarinfo(spec)
            archive.addfile(info, io.BytesIO(payload) if payload is not None else None)
    tmp.replace(out)
    return out


# --------------------------------------------------------------------------------------------------
# Private containerd


class CtrError(RuntimeError):
    """A ctr-remote invocation failed; the message carries its final stderr line, `.stderr` all of it."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class Containerd:
    """Private containerd: own root/state/socket under `workdir` (spec estargz.md §B4)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        socket_path = self.workdir / "sock"
        self._socket_dir: Path | None = None
        if len(str(socket_path)) > _UNIX_PATH_MAX:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="stargzfs-ctd-"))
            socket_path = self._socket_dir / "sock"
        self.socket = str(socket_path)
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Containerd {self.socket} {'running' if self.running else 'stopped'}>"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        def quoted(path: Path | str) -> str:
            return json.dumps(str(path))  # a JSON string is a valid TOML basic string

        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.aufs",
        ]
        text = "\n".join(
            [
                "version = 2",
                f"root = {quoted(self.workdir / 'root')}",
                f"state = {quoted(self.workdir / 'state')}",
                f"disabled_plugins = {json.dumps(disabled)}",
                "[grpc]",
                f"  address = {quoted(self.socket)}",
                "[ttrpc]",
                f"  address = {quoted(self.socket + '.ttrpc')}",
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {quoted(self.workdir / 'opt')}",
                "",
            ]
        )
        self.config_path.write_text(text)

    def start(self) -> None:
        """Start the daemon and wait until `ctr version` answers. Idempotent."""
        if self.running:
            return
        for binary in (CONTAINERD_BINARY, CTR_BINARY):
            if shutil.which(binary) is None:
                raise RuntimeError(f"{binary} not found (apt-get install containerd stargz-snapshotter)")
        from .registry import DaemonStartError, spawn_daemon  # noqa: PLC0415 - see the TYPE_CHECKING note

        self._write_config()
        try:
            self._process = spawn_daemon(
                [CONTAINERD_BINARY, "--config", str(self.config_path)], self.log_path, self.log_path,
                ready=self._socket_answers, readiness=f"open {self.socket}", timeout=_START_TIMEOUT_S,
            )
        except DaemonStartError:
            self.stop()  # removes the private socket dir
            raise
        self.ctr("version")

    def _socket_answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket)
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Terminate and reap only our own daemon."""
        from .registry import stop_process  # noqa: PLC0415 - see the TYPE_CHECKING note

        process, self._process = self._process, None
        if process is not None:
            stop_process(process, 15)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def ctr(self, *args: str, env: dict | None = None) -> str:
        """Run `ctr-remote -a SOCK -n default ARGS`; GOMAXPROCS=1 for reproducible conversions."""
        child_env = {
            key: value for key, value in os.environ.items()
            if not key.startswith("CONTAINERD_")
        }
        child_env["GOMAXPROCS"] = "1"
        if env:
            child_env.update(env)
        argv = [CTR_BINARY, "-a", self.socket, "-n", "default", *args]
        try:
            completed = subprocess.run(
                argv, env=child_env, stdin=subprocess.DEVNULL, capture_output=True,
                timeout=_CTR_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as timeout:
            raise CtrError(f"ctr-remote {' '.join(args)} timed out after {_CTR_TIMEOUT_S}s") from timeout
        if completed.returncode != 0:
            stderr = completed.stderr.decode(errors="replace").strip()
            # Warnings come first; the reason is the last line ("ctr-remote: ...").
            reason = stderr.splitlines()[-1] if stderr else "(no stderr)"
            raise CtrError(
                f"ctr-remote {' '.join(args)} failed ({completed.returncode}): {reason}", stderr
            )
        return completed.stdout.decode(errors="replace")


# --------------------------------------------------------------------------------------------------
# Images


@dataclass
class Layer:
    """One pushed layer, bound to the registry/repository it lives in."""

    digest: str
    size: int
    media_type: str
    annotations: dict[str, str]
    toc_digest: str | None  # annotation containerd.io/snapshot/stargz/toc.digest
    registry: RegistryProcess = field(repr=False)
    repository: str = ""
    diff_id: str = ""  # from the image config

    def blob(self) -> bytes:
        """The stored blob bytes, read from the registry's disk (no HTTP request, no log line)."""
        return self.registry.blob_path(self.digest).read_bytes()

    @property
    def url(self) -> str:
        return f"{self.registry.url}/v2/{self.repository}/blobs/{self.digest}"


@dataclass
class PushedImage:
    ref: str  # 127.0.0.1:PORT/<repository>:<tag>
    repository: str
    tag: str
    layers: list[Layer]  # base first
    manifest: dict
    manifest_digest: str = ""
    config: dict = field(default_factory=dict)
    compression: str = "gzip"
    registry: RegistryProcess | None = field(default=None, repr=False)

    @property
    def manifest_url(self) -> str:
        assert self.registry is not None
        return f"{self.registry.url}/v2/{self.repository}/manifests/{self.tag}"


def _split_name(name: str) -> tuple[str, str]:
    """'t/img:esgz' -> ('t/img', 'esgz'); a name without a tag gets 'latest'."""
    last = name.rsplit("/", 1)[-1]
    repository, tag = (name.rsplit(":", 1) if ":" in last else (name, "latest"))
    if not repository or repository != repository.lower() or repository.startswith("/") or not tag:
        raise ValueError(f"image name must be a lowercase repository path[:tag], got {name!r}")
    return repository, tag


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer_tar_bytes(layer: Sequence[FileSpec] | Path, scratch: Path, index: int) -> bytes:
    if isinstance(layer, (str, Path)):
        return Path(layer).read_bytes()
    return make_layer_tar(list(layer), scratch / f"layer{index}.tar").read_bytes()


def _descriptor(media_type: str, data: bytes) -> dict:
    return {"mediaType": media_type, "digest": _sha256(data), "size": len(data)}


@dataclass(frozen=True)
class _SourceLayer:
    diff_id: str  # sha256 of the uncompressed tar
    compressed: bytes  # the gzip blob containerd imports


def _source_layer(tar_or_gzip: bytes) -> _SourceLayer:
    if tar_or_gzip[:2] == b"\x1f\x8b":  # caller handed us an already gzipped tar
        return _SourceLayer(_sha256(gzip.decompress(tar_or_gzip)), tar_or_gzip)
    # mtime=0 keeps the source (and so the converted) digests reproducible.
    return _SourceLayer(_sha256(tar_or_gzip), gzip.compress(tar_or_gzip, compresslevel=1, mtime=0))


def _distinct_layers(sources: list[_SourceLayer]) -> list[_SourceLayer]:
    """First occurrence of each diffID, in order."""
    seen: set[str] = set()
    distinct = []
    for source in sources:
        if source.diff_id not in seen:
            seen.add(source.diff_id)
            distinct.append(source)
    return distinct


def _write_oci_archive(source_layers: list[_SourceLayer], tag: str, out: Path) -> None:
    """A single-image OCI layout tar (spec Part C step 2), N gzip layers, reproducible bytes."""
    blobs: dict[str, bytes] = {}
    layer_descriptors: list[dict] = []
    diff_ids: list[str] = []
    for layer in source_layers:
        diff_ids.append(layer.diff_id)
        layer_descriptors.append(_descriptor(OCI_LAYER_GZIP, layer.compressed))
        blobs[_sha256(layer.compressed)] = layer.compressed
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"stargzfs test layer {i}"} for i in range(len(diff_ids))],
        },
        sort_keys=True,
    ).encode()
    blobs[_sha256(config)] = config
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": layer_descriptors,
        }
    ).encode()
    blobs[_sha256(manifest)] = manifest
    index_descriptor = _descriptor(OCI_MANIFEST, manifest)
    index_descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
    members = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps({"schemaVersion": 2, "manifests": [index_descriptor]}).encode(),
        **{f"blobs/sha256/{digest.split(':', 1)[1]}": data for digest, data in blobs.items()},
    }
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as archive:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            archive.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    tmp.replace(out)


def fetch_manifest(registry: RegistryProcess, repository: str, reference: str) -> tuple[dict, str]:
    """GET an OCI manifest over HTTP; returns (manifest, its digest)."""
    response = httpx.get(
        f"{registry.url}/v2/{repository}/manifests/{reference}",
        headers={"Accept": OCI_MANIFEST},
        timeout=30.0,
    )
    response.raise_for_status()
    return response.json(), _sha256(response.content)


def upload_blob(registry: RegistryProcess, repository: str, data: bytes) -> str:
    """Monolithic blob upload (POST then PUT ?digest=); returns the digest."""
    digest = _sha256(data)
    started = httpx.post(f"{registry.url}/v2/{repository}/blobs/uploads/", timeout=30.0)
    started.raise_for_status()
    location = httpx.URL(registry.url).join(started.headers["location"])
    finished = httpx.put(
        location.copy_merge_params({"digest": digest}),
        content=data,
        headers={"Content-Type": "application/octet-stream"},
        timeout=60.0,
    )
    finished.raise_for_status()
    return digest


def put_manifest(registry: RegistryProcess, repository: str, reference: str, manifest: dict) -> str:
    """PUT an OCI manifest; returns its digest."""
    body = json.dumps(manifest, indent=3).encode()
    response = httpx.put(
        f"{registry.url}/v2/{repository}/manifests/{reference}",
        content=body,
        headers={"Content-Type": manifest.get("mediaType", OCI_MANIFEST)},
        timeout=30.0,
    )
    response.raise_for_status()
    return _sha256(body)


def _push_expanded(
    registry: RegistryProcess, repository: str, tag: str, manifest: dict, config: dict,
    order: list[int],
) -> tuple[dict, str, dict]:
    """Re-tag `repository:tag` with a manifest whose layer i is converted distinct layer order[i]."""
    diff_ids = config["rootfs"]["diff_ids"]
    config = {
        **config,
        "rootfs": {**config["rootfs"], "diff_ids": [diff_ids[i] for i in order]},
        "history": [{"created_by": f"stargzfs test layer {i}"} for i in range(len(order))],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    upload_blob(registry, repository, config_bytes)
    manifest = {
        **manifest,
        "config": {**manifest["config"], **_descriptor(manifest["config"]["mediaType"], config_bytes)},
        "layers": [manifest["layers"][i] for i in order],
    }
    manifest_digest = put_manifest(registry, repository, tag, manifest)
    return manifest, manifest_digest, config


def fetch_blob(registry: RegistryProcess, repository: str, digest: str) -> bytes:
    response = httpx.get(f"{registry.url}/v2/{repository}/blobs/{digest}", timeout=60.0)
    response.raise_for_status()
    return response.content


_build_counter = itertools.count()
_CONVERT_ATTEMPTS = 4


def _convert_with_retry(containerd: Containerd, argv: list[str]) -> None:
    """Run `images convert`, retrying ctr-remote 0.12's self-inflicted ingest-lock race.

    The converter handles layers concurrently; two layers with identical content race for the same
    ingest ref and one fails with "ref ... locked ...: unavailable". A rerun finds the content done.
    """
    for attempt in range(1, _CONVERT_ATTEMPTS + 1):
        try:
            containerd.ctr(*argv)
            return
        except CtrError as error:
            if "locked" not in str(error) or attempt == _CONVERT_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)


def build_image(
    containerd: Containerd,
    registry: RegistryProcess,
    name: str,
    layers: Sequence[Sequence[FileSpec]] | Sequence[Path],
    *,
    compression: str = "gzip",
    chunk_size: int | None = None,
    prioritized_files: Sequence[str] | None = None,
    compression_level: int | None = None,
) -> PushedImage:
    """Build, convert (ctr-remote) and push an N-layer image to `registry` as 127.0.0.1:PORT/<name>.

    compression: "gzip" → `convert --oci --estargz`; "zstd" → `--oci --zstdchunked`; "plain" → the
    unconverted gzip OCI image (not eStargz). `prioritized_files` ("etc/hello.txt", …) feeds
    `--estargz-record-in` and yields a `.prefetch.landmark`.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if not layers:
        raise ValueError("an image needs at least one layer")
    if compression == "plain" and (chunk_size or prioritized_files or compression_level is not None):
        raise ValueError("chunk_size/prioritized_files/compression_level need an eStargz compression")
    repository, tag = _split_name(name)
    build_id = next(_build_counter)
    scratch = containerd.workdir / "builds" / f"{build_id}-{repository.replace('/', '_')}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        sources = [_source_layer(_layer_tar_bytes(layer, scratch, i)) for i, layer in enumerate(layers)]
        # ctr-remote 0.12 converts layers concurrently and breaks on identical ones (they share
        # ingest refs and temp blobs), so convert each distinct layer once and re-expand afterwards.
        distinct = sources if compression == "plain" else _distinct_layers(sources)
        archive = scratch / "oci.tar"
        _write_oci_archive(distinct, tag, archive)

        source_ref = f"stargzfs.invalid/src/{build_id}:{tag}"
        target_ref = f"{registry.host}/{repository}:{tag}"
        containerd.ctr(
            "images", "import", "--no-unpack", "--base-name", f"stargzfs.invalid/src/{build_id}",
            str(archive),
        )
        try:
            if compression == "plain":
                containerd.ctr("images", "tag", "--force", source_ref, target_ref)
            else:
                convert = ["images", "convert", "--oci"]
                convert.append("--estargz" if compression == "gzip" else "--zstdchunked")
                if chunk_size is not None:
                    convert += ["--estargz-chunk-size", str(chunk_size)]
                if compression_level is not None:
                    convert += ["--estargz-compression-level", str(compression_level)]
                if prioritized_files:
                    record = scratch / "record.json"
                    record.write_text(
                        "".join(json.dumps({"path": path.lstrip("/")}) + "\n" for path in prioritized_files)
                    )
                    convert += ["--estargz-record-in", str(record)]
                _convert_with_retry(containerd, [*convert, source_ref, target_ref])
            containerd.ctr("images", "push", "--plain-http", target_ref)
        finally:
            try:
                containerd.ctr("images", "rm", source_ref, target_ref)
            except CtrError:
                pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    manifest, manifest_digest = fetch_manifest(registry, repository, tag)
    config = json.loads(fetch_blob(registry, repository, manifest["config"]["digest"]))
    if len(distinct) != len(sources):
        position = {layer.diff_id: index for index, layer in enumerate(distinct)}
        order = [position[source.diff_id] for source in sources]
        manifest, manifest_digest, config = _push_expanded(registry, repository, tag, manifest, config, order)
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    pushed_layers = []
    for index, descriptor in enumerate(manifest["layers"]):
        annotations = dict(descriptor.get("annotations") or {})
        pushed_layers.append(
            Layer(
                digest=descriptor["digest"],
                size=int(descriptor["size"]),
                media_type=descriptor["mediaType"],
                annotations=annotations,
                toc_digest=annotations.get(TOC_DIGEST_ANNOTATION),
                registry=registry,
                repository=repository,
                diff_id=diff_ids[index] if index < len(diff_ids) else "",
            )
        )
    return PushedImage(
        ref=f"{registry.host}/{repository}:{tag}",
        repository=repository,
        tag=tag,
        layers=pushed_layers,
        manifest=manifest,
        manifest_digest=manifest_digest,
        config=config,
        compression=compression,
        registry=registry,
    )


class ImageCache:
    """Session memo of built images so several test modules share one build per key."""

    def __init__(self) -> None:
        self._images: dict[object, PushedImage] = {}

    def get(self, key: object, builder: Callable[[], PushedImage]) -> PushedImage:
        if key not in self._images:
            self._images[key] = builder()
        return self._images[key]

    def __contains__(self, key: object) -> bool:
        return key in self._images

    def __len__(self) -> int:
        return len(self._images)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """One private containerd for the session (root only)."""
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def image_cache() -> ImageCache:
    return ImageCache()

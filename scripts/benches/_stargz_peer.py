"""stargz-snapshotter's lazy FUSE filesystem as a benchmark peer (build, run, mount an image).

`stargz_peer/main.go` wraps the snapshotter's `fs.NewFilesystem` in a small process that mounts
layers on stdin commands. It is built offline in GOPATH mode from Debian's packaged sources (the
packages below, bench-only: the test suite does not need them) and cached by source hash.

An image is shown the way stargz-snapshotter shows it to a container: one FUSE mount per layer
(each its own `FileSystem.Mount` with the labels containerd's remote-snapshot handler attaches),
mounted base first, and a read-only overlayfs over them when there is more than one layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.erofs import mount_overlay, umount  # noqa: E402
from support.fusemount import is_mounted  # noqa: E402
from support.gohelper import gopath_build  # noqa: E402
from support.images import TOC_DIGEST_ANNOTATION, PushedImage  # noqa: E402

GO_PACKAGES = (  # what main.go compiles against (their versions are part of the build key)
    "golang-go",
    "golang-github-containerd-stargz-snapshotter-dev",
    "golang-github-hanwen-go-fuse-dev",
)
PEER_APT_PACKAGES = (*GO_PACKAGES, "fuse3")
SOURCES = Path(__file__).resolve().parent / "stargz_peer"
BUILD_CACHE = Path("/var/tmp/stargzfs-bench-peer")
IMPORT_PATH = "stargzfs-bench/stargz-peer"
COMMAND_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0

# Labels containerd's remote-snapshot handler (stargz-snapshotter fs/source) puts on each layer.
REFERENCE_LABEL = "containerd.io/snapshot/remote/stargz.reference"
DIGEST_LABEL = "containerd.io/snapshot/remote/stargz.digest"
IMAGE_LAYERS_LABEL = "containerd.io/snapshot/remote/stargz.layers"


def ensure_apt_packages(packages: Sequence[str] = PEER_APT_PACKAGES) -> None:
    """Install whichever of `packages` are missing (like scripts/setup.sh, but bench-only)."""
    missing = [
        package for package in packages
        if "install ok installed" not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        ).stdout
    ]
    if not missing:
        return
    print(f"bench: installing apt packages: {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=sys.stderr)


def _build_key() -> str:
    """Source hash plus the packaged versions it compiles against, so an apt upgrade rebuilds."""
    digest = hashlib.sha256()
    for source in sorted(SOURCES.glob("*.go")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    versions = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}=${Version}\n", *GO_PACKAGES],
        capture_output=True, text=True, check=False,
    ).stdout
    digest.update(versions.encode())
    return digest.hexdigest()[:16]


def peer_binary() -> Path:
    """The built stargz-peer, compiled on first use for this source + package versions."""
    binary = BUILD_CACHE / _build_key() / "stargz-peer"
    if binary.exists():
        return binary
    ensure_apt_packages()
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stargz-peer-build-") as work:
        staged = Path(work) / "stargz-peer"
        gopath_build(SOURCES, IMPORT_PATH, Path(work), staged)
        os.replace(staged, binary)  # atomic: a concurrent run sees either nothing or the whole binary
    return binary


def layer_labels(image: PushedImage, index: int) -> dict[str, str]:
    """Labels of layer `index` as containerd's handler sets them (fs/source AppendDefaultLabels...):
    the neighbouring layers (this one and those above it) let Mount pre-resolve them in parallel."""
    layer = image.layers[index]
    if layer.toc_digest is None:
        raise ValueError(f"layer {layer.digest} has no {TOC_DIGEST_ANNOTATION} annotation (not eStargz)")
    return {
        REFERENCE_LABEL: image.ref,
        DIGEST_LABEL: layer.digest,
        TOC_DIGEST_ANNOTATION: layer.toc_digest,
        IMAGE_LAYERS_LABEL: ",".join(later.digest for later in image.layers[index:]),
    }


class PeerError(RuntimeError):
    """The peer answered a command with an error, or died."""


class StargzPeer:
    """One stargz-peer process = one stargz-snapshotter filesystem (its resolver caches and state dir).

    `root` plays the snapshotter's ROOT/stargz: each resolved layer gets fresh `fscache/<tmp>` and
    `httpcache/<tmp>` dirs there, so a new process never reuses an old one's cache; a layer unmounted
    and mounted again within the same process is served from its resolver cache (TTL 120 s).
    """

    def __init__(self, root: Path, log_path: Path, config: dict | None = None) -> None:
        self.root = Path(root)
        self.log_path = Path(log_path)
        self.config = config or {}
        self._process: subprocess.Popen[str] | None = None
        self._log: IO[bytes] | None = None
        self._mounted: list[Path] = []

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def start(self) -> None:
        """Spawn the process; it is ready once it reads stdin, so the first command's reply says so."""
        binary = peer_binary()
        self.root.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            [str(binary), "-root", str(self.root), "-config", json.dumps(self.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
        )

    def _command(self, **command: object) -> float:
        process = self._process
        if process is None or process.poll() is not None:
            raise PeerError(f"stargz-peer is not running (log: {self.log_path})")
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(command) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()  # the peer answers every command; EOF means it died
        if not line:
            raise PeerError(f"stargz-peer exited during {command['op']} (log: {self.log_path})")
        reply = json.loads(line)
        if not reply["ok"]:
            raise PeerError(f"stargz-peer {command['op']} {command.get('mountpoint')}: {reply['error']}")
        return float(reply["seconds"])

    def mount(self, mountpoint: Path, labels: dict[str, str]) -> float:
        """FileSystem.Mount: resolve the blob, fetch + verify the TOC, serve it; returns its seconds."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        seconds = self._command(op="mount", mountpoint=str(mountpoint), labels=labels)
        self._mounted.append(mountpoint)
        return seconds

    def unmount(self, mountpoint: Path) -> float:
        """FileSystem.Unmount (MNT_FORCE); the layer stays in the resolver cache."""
        self._mounted.remove(mountpoint)
        return self._command(op="unmount", mountpoint=str(mountpoint))

    def stop(self) -> None:
        """Close stdin (the peer unmounts what it still holds and exits), reap it, clear leftovers."""
        process, self._process = self._process, None
        if process is not None:
            assert process.stdin is not None
            try:
                process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        for mountpoint in self._mounted:
            if is_mounted(mountpoint):  # only if the peer was killed: do not leave a dead FUSE mount
                umount(mountpoint)
        self._mounted.clear()
        if self._log is not None:
            self._log.close()
            self._log = None


class PeerImageMount:
    """An image's merged tree served by a StargzPeer: one FUSE mount per layer + overlayfs.

    `mount()` returns per-layer Mount seconds; `view` is the merged tree (the only layer's mount
    for a one-layer image, since the kernel wants two lowerdirs for a read-only overlay).
    """

    def __init__(self, peer: StargzPeer, image: PushedImage, base: Path) -> None:
        self.peer = peer
        self.image = image
        self.base = Path(base)
        self.layer_dirs = [self.base / "layers" / str(index) for index in range(len(image.layers))]
        self._overlay = self.base / "merged"

    @property
    def view(self) -> Path:
        return self.layer_dirs[0] if len(self.layer_dirs) == 1 else self._overlay

    def mount(self) -> list[float]:
        """Base layer first, like the chain of remote-snapshot Prepares during a pull."""
        seconds = [self.peer.mount(directory, layer_labels(self.image, index))
                   for index, directory in enumerate(self.layer_dirs)]
        if len(self.layer_dirs) > 1:
            self._overlay.mkdir(parents=True, exist_ok=True)
            mount_overlay(list(reversed(self.layer_dirs)), self._overlay)
        return seconds

    def unmount(self) -> None:
        if len(self.layer_dirs) > 1 and is_mounted(self._overlay):
            umount(self._overlay)
        for directory in reversed(self.layer_dirs):
            if is_mounted(directory):
                self.peer.unmount(directory)

"""Builds and drives tests/go/snapdb, a Go helper using containerd's own snapshots/storage.

Built offline in GOPATH mode against Debian's golang-github-containerd-containerd-dev
(which pulls in golang-github-coreos-bbolt-dev for go.etcd.io/bbolt), once per session.
Also usable outside pytest (scripts/benches/snapshots.py) via `build_snapdb`; `gopath_build` builds
any other Go main the same way (scripts/benches/_stargz_peer.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

GO_SOURCES = Path(__file__).resolve().parents[1] / "go"
GOCODE = Path("/usr/share/gocode")
STORAGE_PACKAGE = GOCODE / "src/github.com/containerd/containerd/snapshots/storage"
IMPORT_ROOT = "stargzfs-tests"
# Go's build cache is content-addressed and safe to share, so keep it across sessions:
# a warm rebuild is a link step instead of compiling containerd's dependencies again.
GOCACHE = Path(tempfile.gettempdir()) / "stargzfs-gocache"


def find_go() -> str:
    go = shutil.which("go") or ("/usr/lib/go/bin/go" if Path("/usr/lib/go/bin/go").exists() else None)
    if go is None:
        raise RuntimeError("Go toolchain not found: apt-get install golang-go")
    return go


def gopath_build(sources: Path, import_path: str, workdir: Path, binary: Path) -> Path:
    """Compile the Go main package in `sources` to `binary`, offline in GOPATH mode.

    The package is copied to workdir/gopath/src/<import_path>; its imports resolve against Debian's
    golang-*-dev packages in /usr/share/gocode (no modules, no network).
    """
    go = find_go()
    gopath = workdir / "gopath"
    package_dir = gopath / "src" / import_path
    if package_dir.exists():
        shutil.rmtree(package_dir)
    package_dir.mkdir(parents=True)
    for source in Path(sources).glob("*.go"):
        shutil.copy2(source, package_dir)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:{GOCODE}",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOCACHE": str(GOCACHE),
        "CGO_ENABLED": "0",
    }
    result = subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=package_dir, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the Go helper {import_path} failed:\n{result.stderr}")
    return binary


def build_snapdb(workdir: Path) -> Path:
    """Compile tests/go/snapdb into workdir/snapdb (GOPATH mode, no network)."""
    if not (STORAGE_PACKAGE / "bolt.go").exists():
        raise RuntimeError(
            f"{STORAGE_PACKAGE} missing: apt-get install golang-github-containerd-containerd-dev"
        )
    return gopath_build(GO_SOURCES / "snapdb", f"{IMPORT_ROOT}/snapdb", workdir, workdir / "snapdb")


@dataclass(frozen=True)
class Snapdb:
    """The built helper; every call is a separate process that opens and closes the DB."""

    binary: Path

    def apply(self, db: Path, transactions: Iterable[Iterable[dict]]) -> None:
        script = json.dumps({"transactions": [list(ops) for ops in transactions]})
        result = subprocess.run(
            [str(self.binary), "apply", str(db)], input=script, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"snapdb apply failed: {result.stderr.strip()}")

    def _json(self, command: str, db: Path) -> dict:
        result = subprocess.run(
            [str(self.binary), command, str(db)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"snapdb {command} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def list(self, db: Path) -> list[dict]:
        return self._json("list", db)["snapshots"]

    def dump(self, db: Path) -> dict:
        return self._json("dump", db)

    def churn(self, db: Path, stop_file: Path, *, rounds: int, pause_ms: int) -> subprocess.Popen[str]:
        """Start a writer that holds the DB (flock) and commits `rounds` times; see main.go."""
        return subprocess.Popen(
            [str(self.binary), "churn", str(db), str(stop_file), str(rounds), str(pause_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def layer_labels(image: str, digest_hex: str, *, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Labels nydus-snapshotter leaves on a committed layer pulled via CRI."""
    labels = {
        "containerd.io/snapshot/cri.image-ref": image,
        "containerd.io/snapshot/cri.layer-digest": f"sha256:{digest_hex}",
        "containerd.io/snapshot.ref": f"sha256:{digest_hex[::-1]}",
    }
    labels.update(extra or {})
    return labels


def image_chain_ops(
    image: str, layers: int, *, namespace: str = "k8s.io", label_extra: dict[str, str] | None = None
) -> Iterator[dict]:
    """Prepare+Commit for each layer of `image`, bottom to top, named like nydus names them."""
    parent = ""
    for index in range(layers):
        digest_hex = hashlib.sha256(f"{image}#{index}".encode()).hexdigest()
        name = f"sha256:{image.replace('/', '-')}-{index:04d}"
        key = f"{namespace}/{index}/extract-{index} {name}"
        yield {"op": "active", "key": key, "parent": parent,
               "labels": {"containerd.io/snapshot.ref": name}}
        yield {"op": "commit", "key": key, "name": name, "size": 4096 * (index + 1), "inodes": index + 3,
               "labels": layer_labels(image, digest_hex, extra=label_extra)}
        parent = name


def many_snapshots_ops(total: int, *, layers_per_image: int = 50) -> list[dict]:
    """`total` committed layers in images of `layers_per_image`, for one big transaction."""
    ops: list[dict] = []
    images = max(1, total // layers_per_image)
    for image in range(images):
        ops.extend(image_chain_ops(f"registry.local/bench/img{image}:v1", layers_per_image))
    return ops


def build_many_snapshots_db(snapdb: Snapdb, db: Path, total: int) -> Path:
    snapdb.apply(db, [many_snapshots_ops(total)])
    return db


@pytest.fixture(scope="session")
def snapdb(tmp_path_factory: pytest.TempPathFactory) -> Snapdb:
    """The Go helper built from tests/go/snapdb for this session."""
    return Snapdb(build_snapdb(tmp_path_factory.mktemp("snapdb-build")))


@pytest.fixture(scope="session")
def many_snapshots_db(snapdb: Snapdb, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10 000-snapshot metadata.db (multi-level branch pages), written in one Go transaction."""
    return build_many_snapshots_db(snapdb, tmp_path_factory.mktemp("snapdb-10k") / "metadata.db", 10_000)

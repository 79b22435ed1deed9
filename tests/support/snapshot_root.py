"""A snapshotter root as nydus-snapshotter leaves it, and the `stargzfs` daemons that serve it.

metadata.db is written by containerd's own snapshots/storage (the `snapdb` Go helper) with the
labels nydus-snapshotter sets; the daemon is started through the real `stargzfs mount` CLI and
found by the pid it prints. `stargzfs-image` runs as the console script the snapshotter calls.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from stargzfs.snapshots.store import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_TARGET_SNAPSHOT_REF,
    LABEL_TOC_DIGEST,
)
from support.fusemount import is_mounted
from support.paths import VENV_BIN

if TYPE_CHECKING:
    from support.gohelper import Snapdb
    from support.images import PushedImage

STARGZFS = str(VENV_BIN / "stargzfs")
IMAGE_CLI = str(VENV_BIN / "stargzfs-image")
IMAGE_BOOT = "image.boot"


# ------------------------------------------------------------------------------------ CLIs
def image_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `stargzfs-image` as a child process, the way the snapshotter side calls it."""
    return subprocess.run([IMAGE_CLI, *map(str, args)], capture_output=True, text=True, check=False)


def image_cli_ok(*args: str | Path) -> str:
    """`stargzfs-image ARGS` that must succeed; its stdout."""
    done = image_cli(*args)
    assert done.returncode == 0, f"stargzfs-image {args[0]} failed: {done.stderr}"
    return done.stdout


def status(root: Path) -> dict[str, dict]:
    """`stargzfs status ROOT --json`, rows keyed by snapshot id."""
    done = subprocess.run([STARGZFS, "status", str(root), "--json"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return {row["id"]: row for row in json.loads(done.stdout)["snapshots"]}


def lstat_errno(path: Path) -> int:
    """The errno an lstat through the mount gives (0 when it succeeds)."""
    try:
        os.lstat(path)
    except OSError as exc:
        return exc.errno
    return 0


# ------------------------------------------------------------------------------------ daemon
def pid_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_pid_gone(pid: int, timeout: float = 30.0) -> bool:
    """Poll until `pid` is gone; False when it still runs after `timeout`."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


@dataclass
class Daemon:
    """A `stargzfs mount` background daemon, found by the pid the CLI prints."""

    mountpoint: Path
    pid: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_gone(self, timeout: float = 20.0) -> None:
        assert wait_pid_gone(self.pid, timeout), f"daemon {self.pid} did not exit"

    def stop(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        if pid_alive(self.pid):
            try:
                self.wait_gone(15)
            except AssertionError:
                os.kill(self.pid, signal.SIGKILL)

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.wait_gone()
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


def start_daemon(
    root: Path, mountpoint: Path, log: Path, *extra: str | Path, env: dict[str, str] | None = None,
    config: dict[str, float] | None = None,
) -> Daemon:
    """`stargzfs mount ROOT MNT --log-file LOG …`; returns once the CLI says the mount is ready."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    argv: list[str | Path] = [STARGZFS, "mount", root, mountpoint, "--log-file", log, "--log-level", "debug", *extra]
    if config:
        config_path = log.with_suffix(".toml")
        config_path.write_text("[stargzfs]\n" + "".join(f"{key} = {value}\n" for key, value in config.items()))
        argv += ["--config", config_path]
    done = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"mount failed ({done.returncode}): {done.stderr}"
    match = re.search(r"daemon pid (\d+)", done.stderr)
    assert match, done.stderr
    assert is_mounted(mountpoint)
    return Daemon(mountpoint, int(match.group(1)), log)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """start(root, *args, **kw) -> Daemon on a fresh mountpoint; all stopped at teardown."""
    started: list[Daemon] = []

    def start(root: Path, *extra: str | Path, **kwargs: object) -> Daemon:
        number = len(started)
        daemon = start_daemon(root, tmp_path / f"mnt{number}", tmp_path / f"daemon{number}.log", *extra,
                              **kwargs)  # type: ignore[arg-type]
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


# ------------------------------------------------------------------------------------ the root
def hex_of(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass(frozen=True)
class ChainLayer:
    ref: str
    digest: str
    toc_digest: str | None = None
    extra_labels: dict[str, str] = field(default_factory=dict)


def chain_ops(chain: str, layers: Sequence[ChainLayer]) -> list[dict]:
    """Prepare + Commit per layer, bottom up, with the labels nydus-snapshotter leaves."""
    ops: list[dict] = []
    parent = ""
    for index, layer in enumerate(layers):
        name = f"sha256:{chain}-{index}"
        key = f"k8s.io/{chain}/{index}/extract {name}"
        ops.append({"op": "active", "key": key, "parent": parent, "labels": {LABEL_TARGET_SNAPSHOT_REF: name}})
        labels = {LABEL_IMAGE_REF: layer.ref, LABEL_LAYER_DIGEST: layer.digest, LABEL_TARGET_SNAPSHOT_REF: name}
        if layer.toc_digest:
            labels[LABEL_TOC_DIGEST] = layer.toc_digest
        labels.update(layer.extra_labels)
        ops.append({"op": "commit", "key": key, "name": name, "labels": labels, "size": 4096, "inodes": 3})
        parent = name
    return ops


def image_chain(image: PushedImage, ref: str | None = None) -> list[ChainLayer]:
    return [ChainLayer(ref or image.ref, layer.digest, layer.toc_digest) for layer in image.layers]


def write_root(
    snapdb: Snapdb, root: Path, chains: dict[str, list[ChainLayer]], extra_ops: Sequence[dict] = ()
) -> dict[str, str]:
    """metadata.db via containerd's code + one fs dir per snapshot; returns name -> id."""
    root.mkdir(parents=True, exist_ok=True)
    db = root / "metadata.db"
    transaction = [op for chain, layers in chains.items() for op in chain_ops(chain, layers)]
    snapdb.apply(db, [transaction + list(extra_ops)])
    ids = {row["name"]: row["id"] for row in snapdb.list(db)}
    for snapshot_id in ids.values():
        (root / "snapshots" / snapshot_id / "fs").mkdir(parents=True, exist_ok=True)
    return ids


@dataclass
class SnapshotRoot:
    """A root written by `write_root`; chains are addressed as (chain name, layer index)."""

    root: Path
    ids: dict[str, str]  # snapshot name -> id

    def sid(self, chain: str, index: int = 0) -> str:
        return self.ids[f"sha256:{chain}-{index}"]

    def fs(self, chain: str, index: int = 0) -> Path:
        return self.root / "snapshots" / self.sid(chain, index) / "fs"

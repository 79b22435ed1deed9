"""Real stargzfs mounts served by a child process, always unmounted at teardown.

The child is this file run as a script (`python fusemount.py SPEC_JSON READY_FD`): it
builds a provider from the JSON spec and calls stargzfs.fuse.daemon.serve, writing to
READY_FD once the kernel mount exists. Providers:

- "snapshot_root": the real SnapshotRootProvider over ROOT/metadata.db;
- "static": fixed top dirs, an optional warm-up (`warm_up`: seconds, fail), plus optional
  virtual names whose materialize writes the file
  after `delay` seconds (or `delays[name]`), logging "start"/"end" lines to a journal file
  so tests can see how many conversions ran and in what order; `single_flight` de-duplicates concurrent
  materialize calls the way the real pipeline must.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ != "__main__":
    import pytest

SCRIPT = Path(__file__).resolve()
READY_TIMEOUT = 60.0


# --------------------------------------------------------------------------- child side
class StaticProvider:
    """Top dirs from the spec; virtual names materialized with a delay (test double)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.root = Path(spec["root"])
        self._tops_file = Path(spec["tops_file"]) if spec.get("tops_file") else None
        self._tops = {name: Path(path) for name, path in spec.get("tops", {}).items()}
        self._virtual: dict[str, list[str]] = spec.get("virtual", {})
        self._hidden_prefixes = tuple(spec.get("hidden_prefixes", ("converting-stargz", "merging-stargz")))
        self._delay = float(spec.get("delay", 0.0))
        self._delays: dict[str, float] = {k: float(v) for k, v in spec.get("delays", {}).items()}
        self._journal = Path(spec["journal"]) if spec.get("journal") else None
        self._fail: dict[str, int] = {k: getattr(errno, v) for k, v in spec.get("fail", {}).items()}
        self._single_flight = bool(spec.get("single_flight", True))
        self._inflight: dict[tuple[str, str], Any] = {}
        self._warm_up: dict[str, Any] = spec.get("warm_up", {})  # {"seconds": s, "fail": bool}

    def top_dirs(self) -> dict[str, Path]:
        if self._tops_file is not None:
            return {k: Path(v) for k, v in json.loads(self._tops_file.read_text()).items()}
        return dict(self._tops)

    def virtual_names(self, top: str) -> list[str]:
        return list(self._virtual.get(top, ()))

    def is_hidden(self, top: str, name: str) -> bool:
        return name.startswith(self._hidden_prefixes)

    async def warm_up(self) -> None:
        """What the real provider pays before the mount reports ready (journaled)."""
        import trio

        if not self._warm_up:
            return
        self._log("warm-up start")
        await trio.sleep(float(self._warm_up.get("seconds", 0.0)))
        if self._warm_up.get("fail"):
            raise RuntimeError("warm-up failed on purpose")
        self._log("warm-up end")

    def _log(self, line: str) -> None:
        if self._journal is not None:
            with open(self._journal, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    async def materialize(self, top: str, name: str) -> None:
        import trio

        key = (top, name)
        if self._single_flight and key in self._inflight:
            await self._inflight[key].wait()
            return
        done = trio.Event()
        self._inflight[key] = done
        try:
            self._log(f"start {top}/{name}")
            await trio.sleep(self._delays.get(name, self._delay))
            if name in self._fail:
                self._log(f"fail {top}/{name}")
                raise OSError(self._fail[name], f"materialize {name} failed on purpose")
            target = self.top_dirs()[top]
            temp = target / f"converting-stargz-{name}"
            temp.write_text(f"materialized {top}/{name}\n")
            os.chmod(temp, 0o440)
            os.rename(temp, target / name)
            self._log(f"end {top}/{name}")
        finally:
            del self._inflight[key]
            done.set()


def _child_main(spec_json: str, ready_fd: int) -> int:
    from stargzfs.fuse import daemon
    from stargzfs.settings import MountSettings

    spec = json.loads(spec_json)
    settings = MountSettings(
        root=Path(spec["root"]),
        mountpoint=Path(spec["mountpoint"]),
        foreground=True,
        rw=bool(spec.get("rw", False)),
        log_level=spec.get("log_level", "info"),
        entry_timeout=float(spec.get("entry_timeout", 1.0)),
        attr_timeout=float(spec.get("attr_timeout", 1.0)),
    )
    daemon.configure_logging(settings.daemon)
    if spec.get("provider") == "snapshot_root":
        from stargzfs.conversion.provider import SnapshotRootProvider

        provider: Any = SnapshotRootProvider(settings)
    else:
        provider = StaticProvider(spec)

    def ready() -> None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)

    daemon.serve(settings.daemon, provider, on_ready=ready)
    return 0


# --------------------------------------------------------------------------- test side
def is_mounted(path: Path) -> bool:
    wanted = os.path.abspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return any(line.split()[4] == wanted for line in handle)


@dataclass
class RunningMount:
    """One child daemon serving `mountpoint`."""

    mountpoint: Path
    process: subprocess.Popen[bytes]
    log: Path
    spec: dict[str, Any] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Unmount (lazily if busy) and reap the child; safe to call twice."""
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(timeout=15)
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


def start_mount(spec: dict[str, Any], log: Path) -> RunningMount:
    """Start a child daemon for `spec` and return once the mount is live."""
    Path(spec["mountpoint"]).mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    with open(log, "ab") as log_handle:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), json.dumps(spec), str(write_fd)],
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=log_handle,
        )
    os.close(write_fd)
    running = RunningMount(Path(spec["mountpoint"]), process, log, spec)
    deadline = time.monotonic() + READY_TIMEOUT
    with os.fdopen(read_fd, "rb") as pipe:
        import select

        while time.monotonic() < deadline:
            readable, _, _ = select.select([pipe], [], [], 0.5)
            if readable:
                break
        line = pipe.readline() if readable else b""
    if line != b"ready\n":
        running.stop()
        raise RuntimeError(f"mount did not become ready:\n{running.log_text()}")
    return running


if __name__ != "__main__":

    @pytest.fixture
    def fuse_mount(tmp_path: Path) -> Iterator[Callable[..., RunningMount]]:
        """Factory: fuse_mount(spec) -> RunningMount; every mount is torn down afterwards."""
        mounts: list[RunningMount] = []

        def start(spec: dict[str, Any]) -> RunningMount:
            running = start_mount(spec, tmp_path / f"fusemount-{len(mounts)}.log")
            mounts.append(running)
            return running

        yield start
        for running in mounts:
            running.stop()


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], int(sys.argv[2])))

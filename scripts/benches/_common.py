"""Helpers the build and merge benchmarks share (not a benchmark: bench.py skips `_` names)."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_toc(records: list[dict], path: Path) -> None:
    path.write_text(json.dumps({"version": 1, "entries": records}, separators=(",", ":")))


def make_disk_tree(records: list[dict], root: Path) -> None:
    """The TOC's tree on disk, files empty (mkfs.erofs then lays out metadata only, like create)."""
    root.mkdir()
    for record in records:
        name = record["name"].strip("/")
        if not name or name == ".":
            continue
        target = root / name
        if record["type"] == "dir":
            target.mkdir(exist_ok=True)
        elif record["type"] == "symlink":
            target.symlink_to(record["linkName"])
        else:
            target.touch()


def in_child(function: Callable[..., Any], *args: Any) -> None:
    """Run in a forked child: a child's peak RSS (wait4) starts at its parent's RSS when it is
    forked, so the measuring parent must never hold a million generated records.

    Then sync: the inputs (up to a million files for mkfs.erofs) are written back before
    anything is timed, not while the first contender runs and fsyncs its outputs."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            function(*args)
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"preparing the inputs failed (status {status})")
    os.sync()


def measure(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process, from its own wait4() rusage."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed with exit {process.returncode}: {stderr.strip()[-500:]}")
    return elapsed, usage.ru_maxrss / 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def median_seconds(repeat: int, action: Callable[[], object]) -> float:
    """Median wall time of `repeat` calls of `action`."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)

"""Many threads hitting a mount at the same instant: what concurrency tests are made of."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def stat_storm(targets: Sequence[Path], count: int, *, timeout: float = 300.0) -> Iterator[list[object]]:
    """`count` threads stat `targets[slot % len(targets)]`, all released together.

    The block runs while the storm does (probe the mount there); on leaving it every thread
    has finished, and the yielded list holds each slot's st_size or its OSError.
    """
    results: list[object] = [None] * count
    barrier = threading.Barrier(count + 1)

    def look(slot: int) -> None:
        barrier.wait()
        try:
            results[slot] = os.stat(targets[slot % len(targets)]).st_size
        except OSError as exc:
            results[slot] = exc

    threads = [threading.Thread(target=look, args=(slot,)) for slot in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    try:
        yield results
    finally:
        for thread in threads:
            thread.join(timeout=timeout)

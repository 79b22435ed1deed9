"""ROOT/stargzfs/state.json: what the FUSE daemon last did per layer and per image.

Written by the mount (conversion/merge outcomes), read by `stargzfs status`. Writers
serialize on a sibling lock file and replace the JSON atomically (temp file in the
same directory + rename), so readers never lock and never see a partial file. A
missing or corrupt file reads as empty state: it is a diagnostic aid, not a source
of truth. Callers must keep secrets out of `error` texts.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stargzfs.atomicio import write_atomically
from stargzfs.errors import StargzfsError, UsageError
from stargzfs.snapshots.layout import STATE_FILE, STATE_LOCK, state_dir

log = logging.getLogger(__name__)

LAYER_STATUSES = ("converted", "not-estargz", "error")
IMAGE_STATUSES = ("merged", "error")  # suggested; any short lower-case word is accepted
MAX_ERROR_CHARS = 2000

_process_lock = threading.Lock()
_STATUS_WORD = re.compile(r"[a-z][a-z-]{0,31}")


def state_path(root: Path) -> Path:
    return state_dir(root) / STATE_FILE


SECTIONS = ("layers", "images", "blobs")


def _empty() -> dict[str, dict[str, dict[str, Any]]]:
    return {section: {} for section in SECTIONS}


def _one_line(error: str | None) -> str | None:
    if error is None:
        return None
    flat = " ".join(error.split())
    return flat if len(flat) <= MAX_ERROR_CHARS else flat[: MAX_ERROR_CHARS - 1] + "…"


def load_state(root: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{"layers": {hex: {...}}, "images": {id: {...}}, "blobs": {hex: {...}}}; empty when missing or unreadable."""
    try:
        raw = json.loads(state_path(root).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _empty()
    state = _empty()
    if isinstance(raw, dict):
        for section in state:
            entries = raw.get(section)
            if isinstance(entries, dict):
                state[section] = {str(k): v for k, v in entries.items() if isinstance(v, dict)}
    return state


def _update(root: Path, section: str, key: str, record: dict[str, Any]) -> None:
    directory = state_dir(root)
    directory.mkdir(mode=0o700, exist_ok=True)
    with _process_lock, open(directory / STATE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = load_state(root)
        state[section][key] = record
        document = json.dumps(state, indent=1, sort_keys=True).encode("utf-8")
        write_atomically(directory / STATE_FILE, document, mode=0o600)


def record_layer(
    root: Path, layer_hex: str, *, status: str, error: str | None = None, snapshot_id: str | None = None,
    seconds: float | None = None, toc_bytes: int | None = None,
) -> None:
    """Remember the outcome of converting one layer (keyed by its 64-hex digest); a conversion
    also its duration (TOC fetch to published bootstrap) and the TOC's size."""
    if status not in LAYER_STATUSES:
        raise UsageError(f"layer status must be one of {', '.join(LAYER_STATUSES)}, not {status!r}")
    record: dict[str, Any] = {"status": status, "error": _one_line(error), "time": time.time()}
    if snapshot_id is not None:
        record["snapshot_id"] = snapshot_id
    if seconds is not None:
        record["seconds"] = round(seconds, 3)
    if toc_bytes is not None:
        record["toc_bytes"] = toc_bytes
    _update(root, "layers", layer_hex, record)


def record_image(root: Path, snapshot_id: str, *, status: str, error: str | None = None) -> None:
    """Remember the outcome of building image.boot in the top layer snapshot `snapshot_id`."""
    if not _STATUS_WORD.fullmatch(status):
        raise UsageError(f"image status must be a short lower-case word like 'merged' or 'error', not {status!r}")
    _update(root, "images", snapshot_id, {"status": status, "error": _one_line(error), "time": time.time()})


def record_blob(root: Path, layer_hex: str, **figures: int) -> None:
    """What lazy serving did for one blob during this mount (fetched bytes, requests, chunks)."""
    _update(root, "blobs", layer_hex, {**{k: int(v) for k, v in figures.items()}, "time": time.time()})


class StateRecorder:
    """Records outcomes from the daemon's event loop: the file is written in a worker thread,
    and a failure to write it is logged, never fatal (state.json is a diagnostic aid)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def layer(self, layer_hex: str, *, status: str, error: str | None = None, snapshot_id: str | None = None,
                    seconds: float | None = None, toc_bytes: int | None = None) -> None:
        await self._write(record_layer, layer_hex, status=status, error=error, snapshot_id=snapshot_id,
                          seconds=seconds, toc_bytes=toc_bytes)

    async def image(self, snapshot_id: str, *, status: str, error: str | None = None) -> None:
        await self._write(record_image, snapshot_id, status=status, error=error)

    async def blob(self, layer_hex: str, **figures: int) -> None:
        await self._write(record_blob, layer_hex, **figures)

    async def _write(self, recorder: Callable[..., None], *args: object, **kwargs: object) -> None:
        import trio  # the daemon's loop; `stargzfs status` reads state without loading trio

        try:
            await trio.to_thread.run_sync(functools.partial(recorder, self.root, *args, **kwargs))
        except (OSError, StargzfsError) as exc:
            log.warning("cannot record state: %s", exc)

"""metadata.db as the event loop sees it: the last good read, refreshed in a worker thread.

FUSE handlers on the loop ask for the snapshot table on every request; a re-read may sleep
while containerd commits, so it never happens on the loop, and a file that turned
unreadable leaves the last good table in service (the error is logged once).
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from stargzfs.errors import StargzfsError
from stargzfs.snapshots.store import SnapshotSource, SnapshotTable

log = logging.getLogger(__name__)


class LiveTable:
    def __init__(self, db: Path) -> None:
        self.db = db
        self.source = SnapshotSource(db)
        self.source.current()  # a broken metadata.db is a start-up error, not an EIO later
        self._refreshing = False
        self._error: str | None = None  # why the last re-read failed (logged once)

    def cached(self) -> SnapshotTable:
        """The table as last read, for synchronous callers on the loop; starts a refresh when stale."""
        if self.source.is_stale():
            self._start_refresh()
        table = self.source.cached()
        assert table is not None  # read at start-up
        return table

    async def fresh(self) -> SnapshotTable:
        """The latest table, re-read in a worker thread if the file changed."""
        if self.source.is_stale():
            await trio.to_thread.run_sync(self.reload)
        table = self.source.cached()
        assert table is not None
        return table

    def _start_refresh(self) -> None:
        if self._refreshing:
            return
        try:
            trio.lowlevel.current_task()
        except RuntimeError:  # not on the event loop: nothing to keep responsive
            self.reload()
            return
        self._refreshing = True
        trio.lowlevel.spawn_system_task(self._refresh)

    async def _refresh(self) -> None:
        try:
            await trio.to_thread.run_sync(self.reload)
        finally:
            self._refreshing = False

    def reload(self) -> None:
        """Re-read metadata.db (blocking); on failure keep serving the last good read."""
        try:
            self.source.current()
        except Exception as exc:  # noqa: BLE001 - whatever the file holds, the last good view stays
            message = str(exc) if isinstance(exc, (StargzfsError, OSError)) else f"{type(exc).__name__}: {exc}"
            if message != self._error:
                log.error("reading %s: %s (serving the last good read)", self.db, message)
            self._error = message
        else:
            self._error = None

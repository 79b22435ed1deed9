"""The seam between the FUSE layer and whatever decides what the mount shows.

The ops layer knows nothing about snapshots, registries or builders: it asks a Provider
which real directories to expose at the top of the mount, which names to list in them
before they exist, which names to hide, and awaits `materialize` when a listed-but-missing
name is looked up. The lazy conversion plugs in here (stargzfs/conversion/provider.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Provider(Protocol):
    """What MNT/ shows; all paths it returns must lie inside `root`."""

    root: Path

    def top_dirs(self) -> Mapping[str, Path]:
        """MNT/<name> -> real directory under root.

        Called whenever MNT/ is listed or looked up in, so it must be cheap (cache on the
        metadata file's stat signature) and must reflect snapshots added or removed since.
        """
        ...

    def virtual_names(self, top: str) -> Sequence[str]:
        """Names listed in MNT/<top>/ even when no such file exists yet."""
        ...

    def is_hidden(self, top: str, name: str) -> bool:
        """True for names in MNT/<top>/ that must never be shown (temp files)."""
        ...

    async def materialize(self, top: str, name: str) -> None:
        """Create MNT/<top>/<name> for real, or raise OSError(errno.ENOENT/EIO, ...).

        A lookup of a virtual name that does not exist yet answers at once with a
        placeholder; the first GETATTR/OPEN of it awaits this, in its own task, so it
        never blocks other FUSE requests (not even lookups or listings of the same dir).
        Several requests for one name can await at once: de-duplicating the work
        (single-flight) is the provider's job.
        """
        ...


class ChangeNotifier(Protocol):
    """Handed to providers that create files on their own (outside `materialize`).

    The ops layer calls `provider.bind_notifier(ops)` at mount time when the provider has
    that method, so the provider can drop the kernel's caches for files it creates in
    directories other than the one being looked up (e.g. a chain's lower layers).
    """

    def notify_changed(self, top: str, name: str) -> None:
        """Drop the kernel's cached entry/attributes for MNT/<top>/<name> and MNT/<top>."""
        ...


class WarmUp(Protocol):
    """Optional: one-time costs (a builder server's imports, an HTTP client) the daemon lets
    the provider pay before it reports the mount ready; requests are served meanwhile."""

    async def warm_up(self) -> None: ...


class LazyFiles(Protocol):
    """Optional: read-only files whose bytes the provider produces on demand (MNT/<dir>/<name>).

    The directory is reached by lookup only (never listed in MNT/), so tools that list MNT/
    see snapshots alone. Contents must never change for a name while it exists: the kernel
    keeps their pages cached across opens.
    """

    lazy_dir: str  # e.g. ".blobs": a name no top dir can have

    def lazy_files(self) -> Mapping[str, int]:
        """name -> size in bytes; cheap, called on every lookup and listing of the dir."""
        ...

    async def open_lazy(self, name: str) -> None:
        """A first open may start background work (prefetch); OSError refuses the open."""
        ...

    async def read_lazy(self, name: str, offset: int, size: int) -> bytes:
        """Exactly the bytes at [offset, offset + size) (fewer only at the end), or OSError."""
        ...

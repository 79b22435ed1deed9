"""The mount table as /proc/self/mountinfo tells it (no pyfuse3: light commands use it too)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple


class MountEntry(NamedTuple):
    """A NamedTuple, not a dataclass: `stargzfs mount-image` and `umount` start faster
    without importing dataclasses (and inspect) for one record (~12 ms of their start)."""

    mountpoint: Path
    fstype: str
    source: str
    device: str = ""  # "major:minor"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_mount(path: Path) -> MountEntry | None:
    """The top-most mount at exactly `path` (no symlink resolution of the last part)."""
    wanted = os.path.abspath(path)
    found: MountEntry | None = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            parts, tail = left.split(), right.split()
            if len(parts) < 5 or len(tail) < 2:
                continue
            if _unescape(parts[4]) == wanted:
                found = MountEntry(Path(wanted), tail[0], _unescape(tail[1]), parts[2])
    return found

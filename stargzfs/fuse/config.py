"""What the FUSE daemon needs to know: the mount itself and its log (no pyfuse3 import here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DaemonSettings:
    mountpoint: Path
    rw: bool = False
    fuse_options: tuple[str, ...] = ()  # extra `-o` options, each possibly comma-separated
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    log_level: str = "info"
    log_file: Path | None = None

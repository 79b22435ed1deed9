"""What the mount's converters share: where they write, what they read, whom they tell."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from stargzfs.conversion.builder import Builder
from stargzfs.conversion.gate import ConversionGate
from stargzfs.conversion.rootdirs import RootDirs
from stargzfs.conversion.state import StateRecorder
from stargzfs.conversion.table import LiveTable

Changed = Callable[..., None]  # (snapshot_id, *names): files appeared in that snapshot's dir


@dataclass(frozen=True)
class MountContext:
    dirs: RootDirs
    table: LiveTable
    recorder: StateRecorder
    builder: Builder
    builder_slots: trio.CapacityLimiter  # builder processes at once, for layers and merges alike
    changed: Changed


class Converter:
    """A producer of one kind of output (layer bootstraps, image.boot), with its own gate."""

    def __init__(self, context: MountContext, gate: ConversionGate) -> None:
        self.dirs = context.dirs
        self.table = context.table
        self.recorder = context.recorder
        self.builder = context.builder
        self.builder_slots = context.builder_slots
        self.changed = context.changed
        self.gate = gate

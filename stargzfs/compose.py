"""image.boot of one snapshot: its chain's layer bootstraps merged base-first (snapshotter §5.3).

A single-layer chain is a copy (reflink where the filesystem can). With fscache the lower
layers' `<hex>.blob.meta` are copied into the top snapshot's fs dir, because nydusd's
fscache work dir is that one directory. Paths handed to the builder are
`/proc/self/fd/<N>/<name>` of dir fds opened without following symlinks (see convert.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from stargzfs.convert import (
    MERGE_TEMP_PREFIX,
    Builder,
    ConversionError,
    copy_file_at,
    publish,
    run_builder,
)
from stargzfs.fdpath import is_regular_at, lstat_at, proc_path, unlink_quietly
from stargzfs.snapshots.store import IMAGE_BOOT


@dataclass(frozen=True)
class ChainLayer:
    """One layer of the chain with its (already converted) bootstrap."""

    snapshot_id: str
    layer_hex: str
    fs_dir_fd: int


async def compose_image(
    top_fs_fd: int,
    layers_base_first: Sequence[ChainLayer],
    *,
    builder: Builder,
    builder_slots: trio.CapacityLimiter,
    fscache: bool,
) -> bool:
    """Write image.boot (0440) into the top fs dir; False when it already existed."""
    if not layers_base_first:
        raise ConversionError("no layers to merge")
    if lstat_at(top_fs_fd, IMAGE_BOOT) is not None:
        return False
    for layer in layers_base_first:
        if not is_regular_at(layer.fs_dir_fd, layer.layer_hex):
            raise ConversionError(
                f"snapshot {layer.snapshot_id}: bootstrap {layer.layer_hex} is missing or not a regular file"
            )
    if fscache:
        for layer in layers_base_first[:-1]:
            meta = f"{layer.layer_hex}.blob.meta"
            if is_regular_at(layer.fs_dir_fd, meta) and lstat_at(top_fs_fd, meta) is None:
                await trio.to_thread.run_sync(copy_file_at, layer.fs_dir_fd, meta, top_fs_fd, meta)
    if len(layers_base_first) == 1:
        only = layers_base_first[0]
        # a copy + fsync of a bootstrap blocks: the daemon's event loop must keep serving meanwhile
        return await trio.to_thread.run_sync(copy_file_at, only.fs_dir_fd, only.layer_hex, top_fs_fd, IMAGE_BOOT)
    temp = f"{MERGE_TEMP_PREFIX}{secrets.token_hex(6)}"
    argv = builder.merge_argv(
        bootstrap=proc_path(top_fs_fd, temp),
        sources=[proc_path(layer.fs_dir_fd, layer.layer_hex) for layer in layers_base_first],
    )
    fds = {top_fs_fd, *(layer.fs_dir_fd for layer in layers_base_first)}
    try:
        async with builder_slots:
            await run_builder(argv, sorted(fds), f"merging {len(layers_base_first)} layers")
        if lstat_at(top_fs_fd, temp) is None:
            raise ConversionError(f"{builder.name} merge wrote no bootstrap")
        return await trio.to_thread.run_sync(publish, top_fs_fd, temp, IMAGE_BOOT)
    finally:
        unlink_quietly(top_fs_fd, temp)

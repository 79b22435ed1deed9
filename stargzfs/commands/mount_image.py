"""`stargzfs mount-image MNT ID TARGET`: a snapshot's image, lazily pulled, on the kernel's erofs.

Opening `MNT/<ID>/image.boot` converts and merges the chain as usual; its blob table names
the layers' blobs, which the mount serves as `MNT/.blobs/<hex>` with bytes fetched from the
registry on first read. The kernel's erofs mounts the bootstrap over them: once a chunk is
local, reads of the image's files involve no userspace filesystem at all (the page cache
answers). `stargzfs umount TARGET` unmounts it.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import sys
from pathlib import Path

from stargzfs.errors import StargzfsError, UsageError
from stargzfs.mountinfo import find_mount

FUSE_TYPE = "fuse.stargzfs"
LAZY_DIR = ".blobs"
IMAGE_BOOT = "image.boot"


class ImageUnavailable(StargzfsError):
    """The snapshot has no image.boot to mount (not eStargz, or its conversion failed)."""

    exit_code = 1


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "mount-image",
        help="mount a snapshot's image with the kernel's erofs over lazily fetched blobs",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("mount", type=Path, metavar="MNT", help="a running `stargzfs mount` of the snapshotter root")
    parser.add_argument("snapshot", metavar="ID", help="the top layer (or container) snapshot id")
    parser.add_argument("target", type=Path, metavar="TARGET", help="empty directory to mount the image on")
    parser.set_defaults(func=run)


def _checked(args: argparse.Namespace) -> tuple[Path, Path]:
    mnt, target = Path(os.path.abspath(args.mount)), Path(os.path.abspath(args.target))
    entry = find_mount(mnt)
    if entry is None or entry.fstype != FUSE_TYPE:
        raise UsageError(f"{mnt} is not a stargzfs mount (start one with: stargzfs mount ROOT {mnt})")
    if "/" in args.snapshot or args.snapshot in ("", ".", "..") or args.snapshot.startswith("."):
        raise UsageError(f"{args.snapshot!r} is not a snapshot id")
    if not target.is_dir():
        raise UsageError(f"TARGET {target} is not a directory")
    if find_mount(target) is not None:
        raise UsageError(f"TARGET {target} is already a mount point")
    if os.path.commonpath([mnt, target]) == str(mnt):
        raise UsageError(f"TARGET {target} is inside the stargzfs mount {mnt}")
    return mnt, target


def _blob_ids(boot: Path, snapshot: str) -> list[str]:
    """Open image.boot (the mount converts and merges the chain now) and read its blob table."""
    from stargzfs.rafs.reader import BootstrapReader

    try:
        with open(boot, "rb") as handle, mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ) as data:
            entries = BootstrapReader(data).blob_entries()  # type: ignore[arg-type]
    except FileNotFoundError:
        raise ImageUnavailable(
            f"snapshot {snapshot} has no image.boot (unknown snapshot, or not every layer is eStargz)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EIO:
            raise ImageUnavailable(
                f"building image.boot of snapshot {snapshot} failed (`stargzfs status ROOT` says why)"
            ) from None
        raise ImageUnavailable(f"cannot read {boot}: {exc.strerror}") from None
    return [entry.blob_id.rstrip(b"\0").decode("ascii", "replace") for entry in entries]


def run(args: argparse.Namespace) -> int:
    from stargzfs.erofsmount import mount_erofs

    mnt, target = _checked(args)
    boot = mnt / args.snapshot / IMAGE_BOOT
    devices = []
    for blob_id in _blob_ids(boot, args.snapshot):
        device = mnt / LAZY_DIR / blob_id
        if not device.is_file():
            raise ImageUnavailable(f"blob {blob_id} of snapshot {args.snapshot} is not served at {device}")
        devices.append(device)
    mount_erofs(boot, devices, target)
    print(f"stargzfs: image of snapshot {args.snapshot} mounted on {target} ({len(devices)} lazy blobs); "
          f"unmount with: stargzfs umount {target}", file=sys.stderr)
    return 0

"""`stargzfs mount ROOT MOUNTPOINT` and `stargzfs umount MOUNTPOINT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stargzfs import cliutil
from stargzfs.errors import UsageError
from stargzfs.settings import FS_DRIVERS, LOG_LEVELS, MountSettings, build_settings


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    mount = sub.add_parser(
        "mount",
        help="serve a nydus-snapshotter root through FUSE",
        description="MNT/<id>/ shows ROOT/snapshots/<id>/fs/ for every snapshot in ROOT/metadata.db. "
        "Without -f the command returns once the mount is ready and the daemon keeps serving.",
    )
    mount.add_argument("paths", nargs="+", metavar="ROOT MOUNTPOINT",
                       help="snapshotter root and mountpoint (ROOT may come from --config instead)")
    mount.add_argument("-f", "--foreground", action="store_true", default=None,
                       help="serve in this process until unmounted or signalled")
    mount.add_argument("--rw", action="store_true", default=None,
                       help="pass writes through to the real dirs (default: read-only, EROFS)")
    mount.add_argument("--fs-driver", choices=FS_DRIVERS, default=None,
                       help="where blob.meta files go: fusedev -> cache dir (default), fscache -> fs dir")
    mount.add_argument("--cache-dir", type=Path, default=None, help="blob cache dir (default ROOT/cache)")
    mount.add_argument("--no-prefetch", dest="prefetch", action="store_false", default=None,
                       help="MNT/.blobs: do not fetch the files before .prefetch.landmark on a blob's first open")
    mount.add_argument("--background-fetch", action="store_true", default=None,
                       help="MNT/.blobs: fill each opened blob's cache completely, yielding to reads")
    mount.add_argument("--nydus-image", type=Path, default=None,
                       help="external nydus-image builder (default: the bundled stargzfs-image)")
    cliutil.add_registry_options(
        mount, timeout=MountSettings.registry_timeout, retries=MountSettings.registry_retries, from_settings=True
    )
    mount.add_argument("--metrics-address", metavar="[HOST]:PORT", default=None,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (':PORT': loopback only; "
                       "default: off)")
    mount.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="default info")
    mount.add_argument("--log-file", type=Path, default=None, help="daemon log (default: stderr)")
    mount.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPT[,OPT]",
                       help="extra FUSE mount options (repeatable)")
    mount.add_argument("--config", type=Path, default=None,
                       help="nydus-snapshotter style config.toml (CLI flags override it)")
    mount.set_defaults(func=run_mount)

    umount = sub.add_parser("umount", help="unmount a stargzfs mount (fusermount3 -u) or an image mounted by mount-image")
    umount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    umount.set_defaults(func=run_umount)


def settings_from_args(args: argparse.Namespace) -> MountSettings:
    if len(args.paths) > 2:
        raise UsageError(f"expected ROOT MOUNTPOINT, got {len(args.paths)} paths")
    root, mountpoint = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    cli = {
        "root": Path(root) if root is not None else None,
        "mountpoint": Path(mountpoint),
        "foreground": args.foreground,
        "rw": args.rw,
        "fs_driver": args.fs_driver,
        "cache_dir": args.cache_dir,
        "prefetch": args.prefetch,
        "background_fetch": args.background_fetch,
        "nydus_image": args.nydus_image,
        "insecure_registries": args.insecure_registry,
        "log_level": args.log_level,
        "log_file": args.log_file,
        "fuse_options": args.fuse_options,
        "registry_timeout": args.registry_timeout,
        "registry_retries": args.registry_retries,
        "auth_timeout": args.auth_timeout,
        "registry_min_rate": args.registry_min_rate,
        "hosts_dir": args.hosts_dir,
        "metrics_address": args.metrics_address,
    }
    return build_settings(cli, args.config)


def run_mount(args: argparse.Namespace) -> int:
    # Imported here so `stargzfs --help` and other sub-commands do not load pyfuse3.
    from stargzfs.conversion.provider import SnapshotRootProvider
    from stargzfs.fuse import daemon

    settings = settings_from_args(args)
    daemon.check_root(settings.root)
    daemon.check_mountpoint(settings.mountpoint, settings.root)
    provider = SnapshotRootProvider(settings)
    if settings.foreground:
        daemon.configure_logging(settings.daemon)
        daemon.serve(settings.daemon, provider)
        return 0
    pid = daemon.mount_background(settings.daemon, provider)
    print(f"stargzfs: serving {settings.root} on {settings.mountpoint} (daemon pid {pid}); "
          f"unmount with: stargzfs umount {settings.mountpoint}", file=sys.stderr)
    return 0


def run_umount(args: argparse.Namespace) -> int:
    from stargzfs.mountinfo import find_mount

    entry = find_mount(args.mountpoint)
    if entry is not None and entry.fstype == "erofs":
        from stargzfs.erofsmount import unmount

        unmount(entry.mountpoint)  # an image `stargzfs mount-image` mounted
        return 0
    from stargzfs.fuse import daemon

    daemon.unmount(args.mountpoint)
    return 0

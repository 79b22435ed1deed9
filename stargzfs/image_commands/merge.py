"""`stargzfs-image merge`: stack layer bootstraps into one bootstrap (nydus-image v2.1 CLI).

nydus-snapshotter runs `merge --bootstrap OUT B_base … B_top` with every source named by
its 64-hex layer digest; the name becomes that layer's blob id. OUT appears atomically
(temp file in the same directory + rename), so a failed merge never leaves a partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from stargzfs.errors import StargzfsError, UsageError


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser(
        "merge",
        help="merge layer bootstraps (lowest first) into one RAFS v6 bootstrap",
        description="Merge RAFS v6 layer bootstraps, lowest layer first, applying OCI whiteouts.",
    )
    parser.add_argument("--bootstrap", "-B", required=True, type=Path, help="output bootstrap")
    parser.add_argument(
        "--parent-bootstrap", "-p", type=Path, default=None,
        help="bootstrap the sources are stacked on (its blob ids are kept)",
    )
    parser.add_argument(
        "--prefetch-policy", "-P", choices=("none",), default="none",
        help="accepted for nydus-image compatibility; only 'none' is supported",
    )
    parser.add_argument(
        "--output-json", "-J", type=Path, default=None, help="write {\"blobs\": [...]} here"
    )
    parser.add_argument(
        "sources", nargs="+", type=Path, metavar="SOURCE",
        help="layer bootstraps, lowest first, each named by its 64-hex layer digest",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stargzfs.rafs.merge import merge_bootstraps  # imported late: keeps `--help` cheap

    result = merge_bootstraps(args.sources, parent=args.parent_bootstrap)
    write_atomically(args.bootstrap, result.bootstrap)
    if args.output_json is not None:
        document = json.dumps({"blobs": list(result.blob_ids)}, indent=2) + "\n"
        write_atomically(args.output_json, document.encode())
    return 0


def write_atomically(destination: Path, data: bytes) -> None:
    """Temp file beside `destination`, fsync, rename: readers see all of it or nothing."""
    directory = destination.parent if str(destination.parent) else Path(".")
    if destination.is_dir():
        raise UsageError(f"output {destination} is a directory")
    try:
        handle, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{destination.name}.", suffix=".tmp")
    except OSError as exc:
        raise StargzfsError(f"cannot create a file in {directory}: {exc.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_name, 0o666 & ~_current_umask())
        os.replace(temp_name, destination)
    except OSError as exc:
        Path(temp_name).unlink(missing_ok=True)
        raise StargzfsError(f"cannot write {destination}: {exc.strerror}") from None
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _current_umask() -> int:
    """mkstemp creates 0600; give OUT the mode a plain open() would have given it."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash must not bring back the old OUT)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as exc:
        raise StargzfsError(f"cannot sync directory {directory}: {exc.strerror}") from None

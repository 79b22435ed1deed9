"""`stargzfs-image check`: structural validation of any RAFS v6 bootstrap (rafs-v6 §6/§9).

`--blob-meta` may repeat; a file named `<blob id>...` is matched to that blob, and with a
single blob any file applies to it. Exit 0 when every check passes, 5 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stargzfs.atomicio import write_atomically
from stargzfs.errors import FormatError, UsageError
from stargzfs.rafs.check import check_bootstrap
from stargzfs.rafs.reader import BootstrapReader


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = sub.add_parser("check", help="validate a RAFS v6 bootstrap (and blob.meta files)")
    parser.add_argument("-B", "--bootstrap", required=True, help="bootstrap to check")
    parser.add_argument("--blob-meta", action="append", default=[], help="blob.meta to cross-check (repeatable)")
    parser.add_argument("-J", "--output-json", help="also write the report as JSON here")
    parser.add_argument("-V", "--verbose", action="store_true", help="list warnings too")
    parser.set_defaults(func=run)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def match_blob_metas(data: bytes, paths: list[str]) -> dict[int, bytes]:
    if not paths:
        return {}
    try:
        reader = BootstrapReader(data)
        ids = [e.blob_id.rstrip(b"\0").decode("ascii", "replace") for e in reader.blob_entries()]
    except FormatError:
        ids = []
    out: dict[int, bytes] = {}
    for path in paths:
        name = Path(path).name
        matches = [i for i, blob_id in enumerate(ids) if blob_id and name.startswith(blob_id)]
        if not matches and len(ids) == 1 and len(paths) == 1:
            matches = [0]
        if not matches:
            raise UsageError(f"cannot tell which blob {path!r} belongs to (name it <blob id>.blob.meta)")
        out[matches[0]] = _read(path, "blob.meta")
    return out


def run(args: argparse.Namespace) -> int:
    data = _read(args.bootstrap, "bootstrap")
    report = check_bootstrap(data, match_blob_metas(data, args.blob_meta))
    print(report.to_text(args.verbose))
    if args.output_json:
        write_atomically(Path(args.output_json), report.to_json().encode() + b"\n")
    if not report.ok:
        # Same list, same order as the "error:" lines just printed, so "first" is the first one shown.
        first = report.errors[0]
        count = f"more than {len(report.errors)}" if report.truncated else str(len(report.errors))
        raise FormatError(f"{args.bootstrap}: {count} check(s) failed, first: {first}")
    return 0

"""`stargzfs-image merge`: stack layer bootstraps into one bootstrap (nydus-image v2.1 CLI).

nydus-snapshotter runs `merge --bootstrap OUT B_base … B_top` with every source named by
its 64-hex layer digest; the name becomes that layer's blob id. OUT appears atomically
(temp file in the same directory + rename), so a failed merge never leaves a partial file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stargzfs import cliutil
from stargzfs.atomicio import write_files_atomically
from stargzfs.gcpause import paused_gc


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
    # The cyclic GC stays off until the merged tree is kept (see cliutil.keep_until_exit),
    # as in `create`: turned back on in between, its next collection walks the whole tree.
    with paused_gc():
        return _merge(args)


def _merge(args: argparse.Namespace) -> int:
    from stargzfs.rafs.merge import merge_bootstraps  # imported late: keeps `--help` cheap

    # A bytearray, not a mapping of the output as `create` uses: at merge sizes the
    # shared-mapping page faults cost more than one write of the finished buffer.
    result = merge_bootstraps(args.sources, parent=args.parent_bootstrap)
    outputs: list[tuple[Path, bytes]] = []
    if args.output_json is not None:
        document = json.dumps({"blobs": list(result.blob_ids)}, indent=2) + "\n"
        outputs.append((args.output_json, document.encode()))
    outputs.append((args.bootstrap, result.bootstrap))  # last: a present OUT means the JSON is there too
    write_files_atomically(outputs)
    cliutil.keep_until_exit(result)  # the merged tree: not freed object by object at exit
    return 0

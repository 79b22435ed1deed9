"""toc: detect + fetch + parse eStargz TOCs of N entries from a loopback registry (ctr-remote images).

For each size an image with N empty files is converted by `ctr-remote i convert --oci --estargz`
(GOMAXPROCS=1) in a private containerd and pushed to a private docker-registry; then
`fetch_toc` runs through `RegistryClient` several times. Reported per size: range requests
(from our counter and the registry's access log), bytes fetched vs the compressed TOC member,
the TOC's size, and the median wall time next to peers on the same machine: a bare ranged
GET of exactly the TOC member bytes (the network floor), `json.loads` of the same TOC bytes
(the yardstick of issue #11: fetch_toc ≤ 1.0× it) and `parse_toc` alone. fetch_toc is timed
both as `stargzfs toc` runs it (parse) and as the mount's daemon does (parse=False: footer,
TOC bytes, digest; the builder subprocess parses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # tests/support: the registry/containerd drivers the suite uses
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median_seconds  # noqa: E402
from stargzfs.estargz.fetch import DEFAULT_TAIL_SIZE, TocResult, fetch_toc  # noqa: E402
from stargzfs.estargz.toc import parse_toc  # noqa: E402
from stargzfs.registry import RegistryClient  # noqa: E402
from support.images import Containerd, FileSpec, PushedImage, build_image  # noqa: E402
from support.registry import RegistryProcess  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entries", default="10000,100000", help="comma-separated TOC sizes (files per layer)")
    parser.add_argument("--repeat", type=int, default=5, help="timed fetches per size (median reported)")
    parser.add_argument("--tail-size", type=int, default=DEFAULT_TAIL_SIZE, help="fetch_toc tail window")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")


def _layer(files: int) -> list[FileSpec]:
    dirs = [FileSpec(f"d{i // 1000:03d}", "dir") for i in range(0, files, 1000)]
    return [FileSpec("", "dir"), *dirs, *(FileSpec(f"d{i // 1000:03d}/f{i:06d}") for i in range(files))]


async def _fetch_once(image: PushedImage, tail_size: int, parse: bool = True) -> tuple[TocResult, float]:
    layer = image.layers[0]
    async with RegistryClient() as client:
        started = time.perf_counter()
        result = await fetch_toc(
            client.blob(image.ref, layer.digest), tail_size=tail_size, expected_digest=layer.toc_digest, parse=parse
        )
        return result, time.perf_counter() - started


def _bare_range_get(image: PushedImage, result: TocResult) -> float:
    """One GET of exactly the compressed TOC member bytes: what the network alone costs."""
    layer = image.layers[0]
    footer = result.footer
    with httpx.Client() as client:
        started = time.perf_counter()
        response = client.get(layer.url, headers={"Range": f"bytes={footer.toc_offset}-{footer.toc_end - 1}"})
        response.raise_for_status()
        return time.perf_counter() - started


def _measure(registry: RegistryProcess, image: PushedImage, files: int, args: argparse.Namespace) -> dict[str, Any]:
    layer = image.layers[0]
    trio.run(_fetch_once, image, args.tail_size)  # warm-up (page cache, imports)
    since = registry.mark()
    result, _ = trio.run(_fetch_once, image, args.tail_size)
    logged = len(registry.access_log()[since:])
    fetch_times, daemon_times, json_times = [], [], []
    for _ in range(args.repeat):  # interleaved: each pair sees the same machine load
        fetch_times.append(trio.run(_fetch_once, image, args.tail_size)[1])
        daemon_times.append(trio.run(_fetch_once, image, args.tail_size, False)[1])
        json_times.append(median_seconds(1, lambda: json.loads(result.raw)))
    bare_s = statistics.median([_bare_range_get(image, result) for _ in range(args.repeat)])
    parse_s = median_seconds(args.repeat, lambda: parse_toc(result.raw))
    fetch_s, daemon_s, json_s = (statistics.median(t) for t in (fetch_times, daemon_times, json_times))
    return {
        "files": files,
        "toc_entries": len(result.toc.entries),
        "blob_bytes": layer.size,
        "toc_json_bytes": len(result.raw),
        "toc_member_bytes": result.footer.toc_compressed_size,
        "requests": result.requests,
        "requests_in_access_log": logged,
        "bytes_fetched": result.bytes_fetched,
        "fetched_over_member": round(result.bytes_fetched / result.footer.toc_compressed_size, 3),
        "fetch_toc_ms": round(fetch_s * 1000, 1),
        "bare_range_get_ms": round(bare_s * 1000, 1),
        "parse_toc_ms": round(parse_s * 1000, 1),
        "json_loads_ms": round(json_s * 1000, 1),
        "fetch_over_json_loads": round(fetch_s / json_s, 2),
        "fetch_no_parse_ms": round(daemon_s * 1000, 1),
        "fetch_no_parse_over_json_loads": round(daemon_s / json_s, 2),
        "fetch_over_bare_get": round(fetch_s / bare_s, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(value) for value in args.entries.split(",") if value.strip()]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stargzfs-bench-toc-"))
    registry = RegistryProcess(workdir / "registry")
    containerd = Containerd(workdir / "containerd")
    rows = []
    build_seconds = {}
    try:
        registry.start()
        containerd.start()
        for files in sizes:
            started = time.perf_counter()
            image = build_image(containerd, registry, f"bench/toc{files}", [_layer(files)])
            build_seconds[files] = round(time.perf_counter() - started, 1)
            rows.append(_measure(registry, image, files, args))
    finally:
        containerd.stop()
        registry.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "rows": rows,
        "load_average": os.getloadavg(),
        "tail_size": args.tail_size,
        "repeat": args.repeat,
        "image_build_seconds (ctr-remote convert, not part of the measurement)": build_seconds,
    }

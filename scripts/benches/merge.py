"""stargzfs-image merge of many layer bootstraps vs stargzfs-image create of one 100k-entry TOC.

Shapes (issue #4): 10 layers × 10k entries and 100 layers × 1k entries, each layer adding its
own subtree, overwriting files of a shared directory and whiting out some files of the layer
below, so the merge does real whiteout and replacement work. Layer bootstraps are built first
(not timed); then `merge` and, as the yardstick, `create` on one generated 100k-entry TOC run
as child processes, alternately (same machine load for both), wall time and peak RSS from
their own wait4(). Target: merge ≤ 1.0× create.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
IMAGE_CLI = str(VENV_BIN / "stargzfs-image")
MODTIME = "2023-01-01T00:00:00Z"
FILES_PER_DIR = 24
SHAPES = {"10x10k": (10, 10_000), "100x1k": (100, 1_000)}
YARDSTICK_ENTRIES = 100_000


def _records(entries: int, layer: int, seed: int) -> list[dict]:
    """One layer: its own dir tree, ~5% overwrites in /shared, ~2% whiteouts of the layer below."""
    rng = random.Random(seed)
    records: list[dict] = [{"name": "./", "type": "dir", "mode": 0o755, "modtime": MODTIME},
                           {"name": "shared/", "type": "dir", "mode": 0o755, "modtime": MODTIME}]
    offset = 512
    own = f"layer{layer}"
    dirs = [own]
    records.append({"name": own + "/", "type": "dir", "mode": 0o755, "modtime": MODTIME})
    counter = 0
    while len(records) < entries:
        counter += 1
        roll = rng.random()
        if roll < 0.05:
            name, size = f"shared/f{rng.randrange(entries)}", rng.randrange(1, 4096)
        elif roll < 0.07 and layer > 0:
            below = f"layer{layer - 1}/f{rng.randrange(entries)}.txt"
            records.append({"name": below.rsplit("/", 1)[0] + "/.wh." + below.rsplit("/", 1)[1], "type": "reg",
                            "mode": 0o644, "modtime": MODTIME})
            continue
        elif roll < 0.15:
            parent = dirs[len(dirs) // FILES_PER_DIR] if len(dirs) > FILES_PER_DIR else own
            name = f"{parent}/d{counter}"
            records.append({"name": name + "/", "type": "dir", "mode": 0o755, "modtime": MODTIME})
            dirs.append(name)
            continue
        else:
            name, size = f"{rng.choice(dirs)}/f{counter}.txt", int(rng.lognormvariate(7, 2)) % (1 << 20)
        record: dict = {"name": name, "type": "reg", "size": size, "mode": 0o644, "modtime": MODTIME}
        if size:
            record["offset"] = offset
            offset += size // 3 + 64
        records.append(record)
    return records


def _write_toc(records: list[dict], path: Path) -> None:
    path.write_text(json.dumps({"version": 1, "entries": records}, separators=(",", ":")))


def _create(toc: Path, bootstrap: Path, blob_id: str) -> list[str]:
    return [IMAGE_CLI, "create", "--source-type", "stargz_index", "--bootstrap", str(bootstrap),
            "--blob-id", blob_id, "--repeatable", "--disable-check", "--fs-version", "6",
            "--chunk-size", "0x400000", "--blob-meta", str(bootstrap) + ".blob.meta", str(toc)]


def _measure(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process, from its own wait4() rusage."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed: {stderr.strip()[-500:]}")
    return elapsed, usage.ru_maxrss / 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--workdir", type=Path, help="keep generated inputs here (default: temp dir, removed)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the best time counts")


def run(args: argparse.Namespace) -> dict:
    shapes = [shape for shape in args.shapes.split(",") if shape]
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(sorted(unknown))}; choose from {', '.join(SHAPES)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stargzfs-bench-merge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        yardstick_dir = workdir / "yardstick"
        yardstick_dir.mkdir(exist_ok=True)
        toc = yardstick_dir / "toc.json"
        _write_toc(_records(YARDSTICK_ENTRIES, 0, seed=1), toc)
        create_argv = _create(toc, yardstick_dir / ("ab" * 32), "ab" * 32)
        for shape in shapes:
            layers, entries = SHAPES[shape]
            case = workdir / shape
            shutil.rmtree(case, ignore_errors=True)
            case.mkdir()
            sources = []
            for layer in range(layers):
                blob_id = hashlib.sha256(f"{shape}-{layer}".encode()).hexdigest()
                layer_toc = case / f"{layer}.json"
                _write_toc(_records(entries, layer, seed=layer), layer_toc)
                subprocess.run(_create(layer_toc, case / blob_id, blob_id), check=True, capture_output=True)
                sources.append(str(case / blob_id))
            merge_argv = [IMAGE_CLI, "merge", "--bootstrap", str(case / "image.boot"), *sources]
            # alternate the two so both see the same machine load; best of each counts
            merges, creates = [], []
            for _ in range(args.repeat):
                merges.append(_measure(merge_argv))
                creates.append(_measure(create_argv))
            merge, create = min(merges), min(creates)
            rows.append({
                "case": f"merge {shape}", "merge_s": round(merge[0], 3), "merge_rss_mib": round(merge[1], 1),
                "create_100k_s": round(create[0], 3), "create_rss_mib": round(create[1], 1),
                "merge/create": round(merge[0] / create[0], 2),
                "paths_out": _path_count(case / "image.boot"),
            })
            shutil.rmtree(case)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    worst = max((row["merge/create"] for row in rows), default=None)
    return {"rows": rows, "target_merge_vs_create_100k": f"{worst}x (target <= 1.0x)"}


def _path_count(bootstrap: Path) -> int:
    """Superblock `inos`: how many paths the merged tree kept (whiteouts and overwrites applied)."""
    with open(bootstrap, "rb") as stream:
        stream.seek(1024 + 16)
        return int.from_bytes(stream.read(8), "little")

"""stargzfs-image merge of many layer bootstraps vs mkfs.erofs and stargzfs-image create on one 100k tree.

Shapes (issue #4): 10 layers × 10k entries and 100 layers × 1k entries, each layer adding its
own subtree, overwriting files of a shared directory and whiting out some files of the layer
below, so the merge does real whiteout and replacement work. Layer bootstraps are built first
(not timed); then `merge`, and as yardsticks `mkfs.erofs` on a 100k-entry tree on disk and
`create` on the same tree's TOC, run as child processes, alternately (same machine load for
all), wall time and peak RSS from their own wait4(). The merged image's sha256 is checked
against the one pinned at commit 12f1215. Target (issue #11): merge ≤ 0.5× mkfs.erofs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import in_child, make_disk_tree, measure, sha256, write_toc  # noqa: E402

VENV_BIN = Path(sys.executable).parent
IMAGE_CLI = str(VENV_BIN / "stargzfs-image")
MODTIME = "2023-01-01T00:00:00Z"
FILES_PER_DIR = 24
SHAPES = {"10x10k": (10, 10_000), "100x1k": (100, 1_000)}
YARDSTICK_ENTRIES = 100_000
#: sha256 of the merged image.boot per shape, as built at commit 12f1215
PINNED = {
    "10x10k": "60245b65ad4e7cf7d977074a4c6f64e9ac76884109550ec57e76d022faf508ef",
    "100x1k": "51ebfdf4b953ba02ca466dd538834eb5c4bf5e2d65105fb7dcb78db1736cb9f4",
}


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


def _create(toc: Path, bootstrap: Path, blob_id: str) -> list[str]:
    return [IMAGE_CLI, "create", "--source-type", "stargz_index", "--bootstrap", str(bootstrap),
            "--blob-id", blob_id, "--repeatable", "--disable-check", "--fs-version", "6",
            "--chunk-size", "0x400000", "--blob-meta", str(bootstrap) + ".blob.meta", str(toc)]


def _prepare_yardstick(directory: Path) -> None:
    records = _records(YARDSTICK_ENTRIES, 0, seed=1)
    write_toc(records, directory / "toc.json")
    make_disk_tree(records, directory / "tree")


def _prepare_layers(case: Path, shape: str) -> None:
    """Each layer's TOC and bootstrap (not timed), in a child (see _common.in_child)."""
    layers, entries = SHAPES[shape]
    for layer in range(layers):
        blob_id = _blob_id(shape, layer)
        layer_toc = case / f"{layer}.json"
        write_toc(_records(entries, layer, seed=layer), layer_toc)
        subprocess.run(_create(layer_toc, case / blob_id, blob_id), check=True, capture_output=True)


def _blob_id(shape: str, layer: int) -> str:
    return hashlib.sha256(f"{shape}-{layer}".encode()).hexdigest()


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
        shutil.rmtree(yardstick_dir, ignore_errors=True)  # a kept --workdir: make_disk_tree needs a fresh tree dir
        yardstick_dir.mkdir()
        in_child(_prepare_yardstick, yardstick_dir)
        create_argv = _create(yardstick_dir / "toc.json", yardstick_dir / ("ab" * 32), "ab" * 32)
        mkfs_argv = ["mkfs.erofs", "--quiet", "-T0", "--all-root", str(yardstick_dir / "erofs.img"),
                     str(yardstick_dir / "tree")]
        for shape in shapes:
            case = workdir / shape
            shutil.rmtree(case, ignore_errors=True)
            case.mkdir()
            in_child(_prepare_layers, case, shape)
            sources = [str(case / _blob_id(shape, layer)) for layer in range(SHAPES[shape][0])]
            merge_argv = [IMAGE_CLI, "merge", "--bootstrap", str(case / "image.boot"), *sources]
            # alternate the three so all see the same machine load; best of each counts
            merges, creates, mkfses = [], [], []
            for _ in range(args.repeat):
                merges.append(measure(merge_argv))
                mkfses.append(measure(mkfs_argv))
                creates.append(measure(create_argv))
            merge, create, mkfs = min(merges), min(creates), min(mkfses)
            rows.append({
                "case": f"merge {shape}", "merge_s": round(merge[0], 3), "merge_rss_mib": round(merge[1], 1),
                "mkfs_erofs_100k_s": round(mkfs[0], 3), "create_100k_s": round(create[0], 3),
                "create_rss_mib": round(create[1], 1),
                "merge/mkfs": round(merge[0] / mkfs[0], 2), "merge/create": round(merge[0] / create[0], 2),
                "paths_out": _path_count(case / "image.boot"),
                "bytes_identical": sha256(case / "image.boot") == PINNED[shape],
            })
            if args.workdir is None:
                shutil.rmtree(case)  # one case's layers at a time; --workdir keeps them for profiling
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    worst = max((row["merge/mkfs"] for row in rows), default=None)
    return {"rows": rows, "load_average": os.getloadavg(), "target_merge_vs_mkfs_100k": f"{worst}x (target <= 0.5x)"}


def _path_count(bootstrap: Path) -> int:
    """Superblock `inos`: how many paths the merged tree kept (whiteouts and overwrites applied)."""
    with open(bootstrap, "rb") as stream:
        stream.seek(1024 + 16)
        return int.from_bytes(stream.read(8), "little")

"""stargzfs-image create on generated TOCs (10k/100k/1M entries) vs mkfs.erofs on the same tree.

Each size gets a TOC with a realistic mix of directories, small files and a few symlinks, and
the same tree made on disk (files empty: mkfs.erofs only lays out metadata then, like create).
Both tools run as subprocesses; wall time and peak RSS come from wait4() of that very child.
The outputs' sha256 are checked against the ones pinned at commit 12f1215 (PINNED), so a
speed-up that changes a byte shows as `bytes_identical: false`. `--phases` adds an in-process
breakdown (parse / tree / layout+write / blob.meta, peak RSS after each) of one more run.
Targets (issue #11): 100k ≤ 0.4× mkfs.erofs and ≤ 150 MiB; 1M ≤ 0.2× mkfs.erofs, ≤ 1 GiB and
≤ 10.5× the 100k time.
"""

from __future__ import annotations

import argparse
import json
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
BLOB_ID = "ab" * 32
FILES_PER_DIR = 24
DIR_SHARE = 0.08
SYMLINK_SHARE = 0.02


#: sha256 of (bootstrap, blob.meta) for the generated TOCs, as built at commit 12f1215
PINNED = {
    10_000: ("5641670d06bfd7eec8e6b293d836f14238a1a128f2545b2e242b8371929162f3",
               "3da2f37dbff23b6eb282ad599010f0a87041d6ee493ecfbaa199635e1551c060"),
    100_000: ("9ed9842dd16379f42a9bf9472fa02214ad89222432e761e29f5972bee43f7783",
                "fb03a1471b31fd7ee993f0811130a9af7677d7d222b40f1cc54e437fe045e97e"),
    1_000_000: ("9d4ba843a568c504c74ae326dab9fd9b6c89fa41904a9725b038c7ca0d89fec8",
                  "f261f34980276d6667a38e936223aa7398319334b96f3be98b546381197766bb"),
}
#: run in a child: where one create's time and memory go
PHASES_CHILD = """
import json, resource, sys, time
from pathlib import Path
from stargzfs.estargz.toc import parse_toc
from stargzfs.gcpause import paused_gc
from stargzfs.rafs.blobmeta import encode_blob_meta
from stargzfs.rafs.from_toc import build_tree
from stargzfs.rafs.writer import write_bootstrap
def rss():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
out, started = {}, time.perf_counter()
raw = Path(sys.argv[1]).read_bytes()
toc = parse_toc(raw, digests=False)
del raw
toc.raw = b""  # as build_bootstrap_from_toc_file does
out["parse_s"], out["parse_peak_mib"] = round(time.perf_counter() - started, 3), rss()
with paused_gc():
    started = time.perf_counter()
    tree = build_tree(toc, blob_id="ab" * 32, consume_toc=True)
    del toc
    out["tree_s"], out["tree_peak_mib"] = round(time.perf_counter() - started, 3), rss()
    started = time.perf_counter()
    bootstrap = write_bootstrap(tree.image)
    out["write_s"], out["write_peak_mib"] = round(time.perf_counter() - started, 3), rss()
    started = time.perf_counter()
    encode_blob_meta(tree.index_records)
    out["blob_meta_s"] = round(time.perf_counter() - started, 3)
print(json.dumps(out))
"""


def _tree(entries: int, seed: int = 7) -> list[dict]:
    """TOC records: a balanced directory tree, small files of varied sizes, some symlinks."""
    rng = random.Random(seed)
    records: list[dict] = [{"name": "./", "type": "dir", "mode": 0o755, "modtime": "2023-01-01T00:00:00Z"}]
    dirs = [""]
    pending_dirs = [""]
    offset = 512
    counter = 0
    while len(records) < entries:
        parent = pending_dirs[0] if pending_dirs else rng.choice(dirs)
        children = 0
        while children < FILES_PER_DIR and len(records) < entries:
            counter += 1
            roll = rng.random()
            prefix = f"{parent}/" if parent else ""
            if roll < DIR_SHARE:
                name = f"{prefix}d{counter}"
                records.append({"name": name + "/", "type": "dir", "mode": 0o755, "modtime": "2023-01-01T00:00:00Z"})
                dirs.append(name)
                pending_dirs.append(name)
            elif roll < DIR_SHARE + SYMLINK_SHARE:
                records.append({"name": f"{prefix}l{counter}", "type": "symlink", "linkName": "../target",
                                "mode": 0o777, "modtime": "2023-01-01T00:00:00Z"})
            else:
                size = int(rng.lognormvariate(7, 2)) % (1 << 20)
                record: dict = {"name": f"{prefix}f{counter}.txt", "type": "reg", "size": size, "mode": 0o644,
                                "modtime": "2023-01-01T00:00:00Z",
                                "digest": "sha256:" + f"{counter:064x}"}
                if size:
                    record["offset"] = offset
                    record["chunkDigest"] = record["digest"]
                    offset += size // 3 + 64
                records.append(record)
            children += 1
        if pending_dirs:
            pending_dirs.pop(0)
    return records


def _prepare(size: int, case: Path) -> None:
    records = _tree(size)
    write_toc(records, case / "toc.json")
    make_disk_tree(records, case / "tree")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated entry counts (add 1000000 for the full run)")
    parser.add_argument("--workdir", type=Path, help="keep generated inputs here (default: temp dir, removed)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and size; the best time counts")
    parser.add_argument("--phases", action="store_true", help="add an in-process phase breakdown per size")


def _phases(toc: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PHASES_CHILD, str(toc)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def run(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="stargzfs-bench-build-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        for size in sizes:
            case = workdir / str(size)
            shutil.rmtree(case, ignore_errors=True)
            case.mkdir()
            toc = case / "toc.json"
            in_child(_prepare, size, case)
            create_argv = [
                str(VENV_BIN / "stargzfs-image"), "create", "--source-type", "stargz_index",
                "--bootstrap", str(case / "boot"), "--blob-id", BLOB_ID, "--repeatable", "--disable-check",
                "--fs-version", "6", "--chunk-size", "0x400000", "--blob-meta", str(case / "meta"), str(toc),
            ]
            mkfs_argv = ["mkfs.erofs", "--quiet", "-T0", "--all-root", str(case / "erofs.img"), str(case / "tree")]
            # alternate the two so both see the same machine load; best of each counts
            creates, mkfses = [], []
            for _ in range(args.repeat):
                creates.append(measure(create_argv))
                mkfses.append(measure(mkfs_argv))
            create, mkfs = min(creates), min(mkfses)
            pinned = PINNED.get(size)
            outputs = (sha256(case / "boot"), sha256(case / "meta"))
            rows.append({
                "entries": size,
                "create_s": round(create[0], 3),
                "create_rss_mib": round(create[1], 1),
                "mkfs_erofs_s": round(mkfs[0], 3),
                "mkfs_erofs_rss_mib": round(mkfs[1], 1),
                "create/mkfs": round(create[0] / mkfs[0], 2),
                "bootstrap_bytes": (case / "boot").stat().st_size,
                "bytes_identical": "not pinned" if pinned is None else outputs == pinned,
                **(_phases(toc) if args.phases else {}),
            })
            shutil.rmtree(case / "tree")
            os.sync()  # the removal's writeback is not the next size's measurement
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    by_size = {row["entries"]: row for row in rows}
    result: dict = {"rows": rows}
    result["load_average"] = os.getloadavg()
    if 100_000 in by_size:
        hundred_k = by_size[100_000]
        result["target_100k_vs_mkfs"] = f"{hundred_k['create/mkfs']}x (target <= 0.4x)"
        result["target_rss_100k"] = f"{hundred_k['create_rss_mib']} MiB (target <= 150 MiB)"
        if 1_000_000 in by_size:
            million = by_size[1_000_000]
            ratio = million["create_s"] / hundred_k["create_s"]
            result["target_1m_vs_100k"] = f"{ratio:.2f}x (target <= 10.5x)"
            result["target_1m_vs_mkfs"] = f"{million['create/mkfs']}x (target <= 0.2x)"
            result["target_rss_1m"] = f"{million['create_rss_mib']} MiB (target <= 1024 MiB)"
    return result

"""`stargzfs status` on a snapshotter root written by containerd's storage code, and state.json."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.gohelper import Snapdb, image_chain_ops
from support.paths import REPO

from stargzfs.conversion import state
from stargzfs.errors import UsageError
from stargzfs.snapshots.store import LABEL_NYDUS_META_LAYER, LABEL_PULL_SECRET, load_snapshots

SECRET = "s3cr3t-pull-token"


def run_status(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargzfs.cli", "status", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def root(snapdb: Snapdb, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two eStargz layers (fusedev and fscache blob.meta), a nydus meta layer, a container."""
    root = tmp_path_factory.mktemp("status-root")
    snapdb.apply(
        root / "metadata.db",
        [
            list(image_chain_ops("registry.local/esgz:v1", 2, label_extra={LABEL_PULL_SECRET: SECRET})),
            [
                {"op": "active", "key": "extract-nydus"},
                {"op": "commit", "key": "extract-nydus", "name": "sha256:nydus-meta",
                 "labels": {LABEL_NYDUS_META_LAYER: "true", "containerd.io/snapshot/cri.image-ref": "r/n:1",
                            "containerd.io/snapshot/cri.layer-digest": "sha256:" + "cd" * 32}},
                {"op": "active", "key": "k8s.io/7/container", "parent": "sha256:registry.local-esgz:v1-0001"},
            ],
        ],
    )
    table = load_snapshots(root / "metadata.db")
    for snapshot in table.all():
        (root / "snapshots" / snapshot.id / "fs").mkdir(parents=True)
    base = table.by_name("sha256:registry.local-esgz:v1-0000")
    top = table.by_name("sha256:registry.local-esgz:v1-0001")
    assert base and top and base.layer_hex and top.layer_hex
    (root / "snapshots" / base.id / "fs" / base.layer_hex).write_bytes(b"bootstrap")
    (root / "cache").mkdir()
    (root / "cache" / f"{base.layer_hex}.blob.meta").write_bytes(b"meta")
    top_fs = root / "snapshots" / top.id / "fs"
    (top_fs / top.layer_hex).write_bytes(b"bootstrap")
    (top_fs / f"{top.layer_hex}.blob.meta").write_bytes(b"meta")
    (top_fs / "image.boot").write_bytes(b"merged")
    state.record_layer(root, base.layer_hex, status="converted", snapshot_id=base.id)
    state.record_layer(root, top.layer_hex, status="error", error="fetch TOC:\n HTTP 500", snapshot_id=top.id)
    state.record_image(root, top.id, status="error", error="can't find bootstrap for snapshot 1")
    return root


def test_status_json_rows(root: Path) -> None:
    result = run_status(root, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    rows = {row["name"]: row for row in document["snapshots"]}
    base = rows["sha256:registry.local-esgz:v1-0000"]
    top = rows["sha256:registry.local-esgz:v1-0001"]
    nydus = rows["sha256:nydus-meta"]
    container = rows["k8s.io/7/container"]
    assert base["candidate"] and base["bootstrap"] and not base["image_boot"]
    assert base["blob_meta"] == ["fusedev"] and base["layer_status"] == "converted"
    assert top["parent_id"] == base["id"] and top["image_boot"] and top["blob_meta"] == ["fscache"]
    assert top["layer_error"] == "fetch TOC: HTTP 500" and top["image_error"].startswith("can't find")
    assert not nydus["candidate"] and nydus["not_candidate_reason"] == "nydus meta (bootstrap) layer"
    assert container["kind"] == "active" and container["not_candidate_reason"] == "not committed (active)"
    assert container["parent_id"] == top["id"] and not container["bootstrap"]
    assert SECRET not in result.stdout


def test_status_table(root: Path) -> None:
    result = run_status(root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "KIND", "PARENT", "CANDIDATE"]
    top_line = next(line for line in lines if "esgz:v1-0001" in line)
    assert "can't find bootstrap for snapshot 1" in top_line and "fscache" in top_line
    assert lines[-1].startswith("4 snapshots")
    assert SECRET not in result.stdout


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "case, exit_code, message",
    [
        ("no-root", 2, "not a directory"),
        ("no-db", 2, "metadata.db: no such file"),
        ("empty", 5, "empty file"),
        ("truncated", 5, "truncated"),
        ("garbage", 5, "not a valid bbolt database"),
        ("unknown-schema", 6, "unknown snapshot metadata schema"),
    ],
)
def test_status_bad_roots(
    snapdb: Snapdb, root: Path, tmp_path: Path, case: str, exit_code: int, message: str
) -> None:
    target = tmp_path / "root"
    target.mkdir()
    db = target / "metadata.db"
    good = (root / "metadata.db").read_bytes()
    if case == "no-root":
        target = tmp_path / "absent"
    elif case == "empty":
        _write(db, b"")
    elif case == "truncated":
        _write(db, good[: 4096 * 3 + 100])
    elif case == "garbage":
        _write(db, bytes(range(256)) * 64)
    elif case == "unknown-schema":
        snapdb.apply(db, [[{"op": "raw-bucket", "key": "v9"}]])
    result = run_status(target)
    assert result.returncode == exit_code, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("stargzfs status: ") and result.stderr.count("\n") == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_state_missing_or_corrupt_reads_empty(tmp_path: Path) -> None:
    assert state.load_state(tmp_path) == {"layers": {}, "images": {}, "blobs": {}}
    _write(state.state_path(tmp_path), b'{"layers": [1, 2], "images": {"3": "nope"')
    assert state.load_state(tmp_path) == {"layers": {}, "images": {}, "blobs": {}}


def test_state_records_and_replaces_atomically(tmp_path: Path) -> None:
    state.record_layer(tmp_path, "ab" * 32, status="error", error="boom")
    state.record_layer(tmp_path, "ab" * 32, status="converted", snapshot_id="4")
    state.record_image(tmp_path, "4", status="merged")
    current = state.load_state(tmp_path)
    assert current["layers"]["ab" * 32]["status"] == "converted"
    assert current["layers"]["ab" * 32]["error"] is None and current["layers"]["ab" * 32]["snapshot_id"] == "4"
    assert current["images"]["4"]["status"] == "merged" and current["images"]["4"]["time"] > 0
    leftovers = sorted(p.name for p in state.state_path(tmp_path).parent.iterdir())
    assert leftovers == ["state.json", "state.lock"]
    with pytest.raises(UsageError, match="layer status"):
        state.record_layer(tmp_path, "ab" * 32, status="done")
    with pytest.raises(UsageError, match="image status"):
        state.record_image(tmp_path, "4", status="Bad Status!")


def test_state_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    script = (
        "import sys; from stargzfs.conversion import state\n"
        "for i in range(15): state.record_layer(sys.argv[1], f'{sys.argv[2]}-{i}', status='converted')\n"
    )
    others = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path), f"proc{n}"], cwd=REPO) for n in range(2)
    ]

    def write(prefix: str) -> None:
        for i in range(15):
            state.record_layer(tmp_path, f"{prefix}-{i}", status="not-estargz")

    threads = [threading.Thread(target=write, args=(f"thread{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [p.wait(timeout=60) for p in others] == [0, 0]
    assert len(state.load_state(tmp_path)["layers"]) == 60


def test_conversion_time_and_toc_size_from_state(tmp_path: Path) -> None:
    from stargzfs.commands.status import render_table

    state.record_layer(tmp_path, "cd" * 32, status="converted", snapshot_id="7", seconds=1.23456, toc_bytes=52_000)
    layer = state.load_state(tmp_path)["layers"]["cd" * 32]
    assert (layer["seconds"], layer["toc_bytes"]) == (1.235, 52_000)
    row = {"id": "7", "kind": "committed", "parent_id": None, "candidate": True, "not_candidate_reason": None,
           "bootstrap": True, "image_boot": False, "blob_meta": ["fusedev"], "name": "sha256:x",
           "convert_seconds": layer["seconds"], "toc_bytes": layer["toc_bytes"],
           "layer_error": None, "image_error": None}
    table = render_table({"snapshots": [row], "txid": 3}).splitlines()
    assert table[0].split()[7:9] == ["CONVERT", "TOC"]
    assert table[1].split()[7:10] == ["1.24s", "50.8", "KiB"]

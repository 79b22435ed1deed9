"""containerd schema decoding: the reader's view must equal containerd's own WalkInfo/GetInfo."""

from __future__ import annotations

import fcntl
import time
from pathlib import Path
from typing import Any

import pytest
from support.gohelper import Snapdb, image_chain_ops, layer_labels

from stargzfs.errors import FormatError, UnsupportedError
from stargzfs.snapshots import bolt, store
from stargzfs.snapshots.store import (
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_NYDUS_DATA_LAYER,
    LABEL_NYDUS_META_LAYER,
    LABEL_PULL_SECRET,
    LABEL_PULL_USERNAME,
    LABEL_TOC_DIGEST,
    LayerCandidate,
    Snapshot,
    SnapshotSource,
    SnapshotTable,
    candidate_reason,
    decode_go_time,
    decode_varint,
    load_snapshots,
)

SECRET = "hunter2-registry-token"


def as_go_listing(table: SnapshotTable) -> list[dict[str, Any]]:
    return [
        {
            "id": s.id,
            "name": s.name,
            "kind": s.kind,
            "parent": s.parent or "",
            "parent_ids": list(s.parent_ids),
            "labels": dict(s.labels),
            "created_ns": s.created_ns,
            "updated_ns": s.updated_ns,
            "size": s.size,
            "inodes": s.inodes,
        }
        for s in table.all()
    ]


@pytest.fixture(scope="module")
def mixed_db(snapdb: Snapdb, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chains of 1, 2, 7 and 100 layers, containers, views, big labels, removals."""
    db = tmp_path_factory.mktemp("store-mixed") / "metadata.db"
    big = {"test/annotation": "x" * 9000, "test/other": "y" * 2500}
    transactions: list[list[dict[str, Any]]] = [
        list(image_chain_ops(f"registry.local/chain{n}:v1", n)) for n in (1, 2, 7, 100)
    ]
    transactions.append(
        list(image_chain_ops("registry.local/private:v1", 2, label_extra={LABEL_PULL_SECRET: SECRET, **big}))
    )
    transactions.append(
        [
            {"op": "active", "key": "k8s.io/50/ctr-a", "parent": "sha256:registry.local-chain100:v1-0099",
             "labels": {"containerd.io/snapshot/overlay.volatile": "true"}},
            {"op": "view", "key": "k8s.io/51/view", "parent": "sha256:registry.local-chain7:v1-0006"},
            {"op": "active", "key": "k8s.io/52/no-parent"},
            {"op": "active", "key": "gone-active", "parent": "sha256:registry.local-chain2:v1-0001"},
            {"op": "active", "key": "gone-extract"},
            {"op": "commit", "key": "gone-extract", "name": "gone-committed", "size": -7, "inodes": -1,
             "labels": big},
        ]
    )
    transactions.append([{"op": "remove", "key": "gone-active"}, {"op": "remove", "key": "gone-committed"}])
    snapdb.apply(db, transactions)
    return db


def test_mixed_db_equals_containerd_listing(snapdb: Snapdb, mixed_db: Path) -> None:
    table = load_snapshots(mixed_db)
    assert as_go_listing(table) == snapdb.list(mixed_db)
    kinds = {s.kind for s in table.all()}
    assert kinds == {"committed", "active", "view"}
    assert max(len(s.parent_ids) for s in table.all()) == 100
    assert table.by_name("gone-committed") is None and table.by_name("gone-active") is None


def test_10k_snapshots_equal_containerd_listing(snapdb: Snapdb, many_snapshots_db: Path) -> None:
    table = load_snapshots(many_snapshots_db)
    assert len(table) == 10_000
    assert as_go_listing(table) == snapdb.list(many_snapshots_db)


def test_lookups_chain_and_children(mixed_db: Path) -> None:
    table = load_snapshots(mixed_db)
    container = table.by_name("k8s.io/50/ctr-a")
    assert container is not None and container.kind == "active"
    top = table.by_id(container.parent_ids[0])
    assert top is not None and top.name == "sha256:registry.local-chain100:v1-0099"
    chain = table.chain(top.id)
    assert [s.id for s in chain] == list(reversed((top.id, *top.parent_ids)))
    assert [s.id for s in table.chain(container.id)] == [s.id for s in chain]  # a container's layers
    assert chain[0].parent is None and chain[0].name.endswith("-0000")
    assert container.id in table.children(top.id)
    for snapshot in table.all():
        if snapshot.parent_id is not None:
            assert snapshot.id in table.children(snapshot.parent_id)
    assert table.last_id == max(int(s.id) for s in table.all()) + 2  # the two removed ones came last
    with pytest.raises(KeyError):
        table.chain("999999")


def test_labels_and_properties(mixed_db: Path) -> None:
    table = load_snapshots(mixed_db)
    layer = table.by_name("sha256:registry.local-private:v1-0001")
    assert layer is not None
    assert layer.image_ref == "registry.local/private:v1"
    assert layer.layer_digest == f"sha256:{layer.layer_hex}" and len(layer.layer_hex or "") == 64
    assert len(layer.labels["test/annotation"]) == 9000  # overflow page value
    assert layer.size == 8192 and layer.inodes == 4
    assert layer.created.tzinfo is not None and layer.created.year >= 2023
    assert SECRET not in repr(layer) and SECRET not in repr(table)


def _snap(kind: str = "committed", **labels: str) -> Snapshot:
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    return Snapshot("1", "n", kind, None, (), labels, now, now, 0, 0)


def test_candidate_reasons() -> None:
    good = layer_labels("registry.local/a:v1", "ab" * 32)
    assert candidate_reason(_snap(**good)) is None
    assert candidate_reason(_snap("active", **good)) == "not committed (active)"
    assert "cri.image-ref" in (candidate_reason(_snap(**{LABEL_LAYER_DIGEST: "sha256:" + "ab" * 32})) or "")
    assert "cri.layer-digest" in (candidate_reason(_snap(**{LABEL_IMAGE_REF: "r/a:1"})) or "")
    assert "64 hex" in (candidate_reason(_snap(**{**good, LABEL_LAYER_DIGEST: "sha512:00"})) or "")
    assert candidate_reason(_snap(**{**good, LABEL_NYDUS_META_LAYER: "true"})) == "nydus meta (bootstrap) layer"
    assert candidate_reason(_snap(**{**good, LABEL_NYDUS_DATA_LAYER: "true"})) == "nydus data layer"


def test_candidate_carries_checked_labels_and_hides_the_secret() -> None:
    good = layer_labels("registry.local/a:v1", "ab" * 32)
    secret_labels = {LABEL_PULL_USERNAME: "user", LABEL_PULL_SECRET: SECRET, LABEL_TOC_DIGEST: "sha256:" + "cd" * 32}
    candidate = _snap(**good, **secret_labels).candidate
    assert candidate == LayerCandidate("1", "ab" * 32, "registry.local/a:v1", "sha256:" + "cd" * 32, ("user", SECRET))
    assert candidate.layer_digest == "sha256:" + "ab" * 32 and SECRET not in repr(candidate)
    assert _snap("active", **good).candidate is None
    # upstream's FromLabels: both pull labels or none
    assert _snap(**good, **{LABEL_PULL_USERNAME: "user", LABEL_PULL_SECRET: ""}).pull_credentials is None
    assert _snap(**good, **{LABEL_PULL_SECRET: SECRET}).pull_credentials is None


def test_value_decoders() -> None:
    assert decode_varint(bytes([0x09]), "size") == -5
    assert decode_varint(bytes([0x80, 0x01]), "size") == 64
    with pytest.raises(FormatError, match="invalid varint"):
        decode_varint(bytes([0x80]), "size")
    moment, unix_ns = decode_go_time(bytes.fromhex("010000000ee29e32af24db38d1ffff"), "t")
    assert unix_ns == 1795963823618346705 and moment.microsecond == 618346
    with pytest.raises(FormatError, match="not a Go binary time"):
        decode_go_time(b"\x01\x02", "t")


def test_unknown_schema_and_bad_values(snapdb: Snapdb, tmp_path: Path) -> None:
    v2 = tmp_path / "v2.db"
    snapdb.apply(v2, [[{"op": "raw-bucket", "key": "v2/snapshots"}]])
    with pytest.raises(UnsupportedError, match="unknown snapshot metadata schema"):
        load_snapshots(v2)

    empty = tmp_path / "empty.db"
    snapdb.apply(empty, [[]])
    assert len(load_snapshots(empty)) == 0

    bad_time = tmp_path / "bad-time.db"
    snapdb.apply(
        bad_time,
        [
            [{"op": "active", "key": "a"}],
            [{"op": "raw-put", "key": "v1/snapshots/a", "name": "createdat", "value": "07ff"}],
        ],
    )
    with pytest.raises(FormatError, match=r"snapshot 'a': createdat: not a Go binary time"):
        load_snapshots(bad_time)

    orphan = tmp_path / "orphan.db"
    snapdb.apply(
        orphan,
        [
            [{"op": "active", "key": "a"}],
            [{"op": "raw-put", "key": "v1/snapshots/a", "name": "parent", "value": b"nowhere".hex()}],
        ],
    )
    with pytest.raises(FormatError, match="parent 'nowhere' does not exist"):
        load_snapshots(orphan)


def test_snapshot_source_rereads_only_after_a_commit(snapdb: Snapdb, tmp_path: Path) -> None:
    db = tmp_path / "metadata.db"
    snapdb.apply(db, [list(image_chain_ops("registry.local/a:v1", 2))])
    source = SnapshotSource(db)
    first = source.current()
    assert source.current() is first
    snapdb.apply(db, [[{"op": "active", "key": "k8s.io/1/ctr", "parent": "sha256:registry.local-a:v1-0001"}]])
    second = source.current()
    assert second is not first and second.txid > first.txid
    assert second.by_name("k8s.io/1/ctr") is not None


def _check_consistent(table: SnapshotTable) -> int:
    """The churn helper's invariant: chain-1..N, solo-max(1,N-2)..N, no active leftovers."""
    chains = sorted(int(s.name.split("-")[1]) for s in table.all() if s.name.startswith("chain-"))
    rounds = len(chains)
    assert chains == list(range(1, rounds + 1))
    for snapshot in table.all():
        if snapshot.name.startswith("chain-"):
            number = int(snapshot.name.split("-")[1])
            assert snapshot.kind == "committed" and snapshot.labels["test/round"] == str(number)
            assert len(snapshot.parent_ids) == number - 1
    solos = sorted(int(s.name.split("-")[1]) for s in table.all() if s.name.startswith("solo-"))
    assert solos == list(range(max(1, rounds - 2), rounds + 1))
    big_labels = [s.labels["test/big"] for s in table.all() if s.name.startswith("solo-")]
    assert all(len(value) == 6000 for value in big_labels)
    assert table.last_id == 2 * rounds
    assert not [s for s in table.all() if s.kind != "committed"]
    return rounds


def test_consistent_reads_while_containerd_storage_commits(snapdb: Snapdb, tmp_path: Path) -> None:
    db = tmp_path / "metadata.db"
    stop = tmp_path / "stop"
    writer = snapdb.churn(db, stop, rounds=400, pause_ms=4)
    seen_rounds: list[int] = []
    retried_reads = 0
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        with open(db, "rb") as probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the writer holds bbolt's flock
        deadline = time.monotonic() + 5  # bounds the test, asserts nothing about speed
        while writer.poll() is None and time.monotonic() < deadline:
            stats: dict[str, int] = {}
            table = load_snapshots(db, stats=stats)
            seen_rounds.append(_check_consistent(table))
            retried_reads += stats["attempts"] > 1
    finally:
        stop.touch()
        writer.wait(timeout=30)
    assert len(seen_rounds) >= 10 and len(set(seen_rounds)) >= 5
    assert seen_rounds == sorted(seen_rounds)  # txids only move forward
    final = load_snapshots(db)
    assert _check_consistent(final) >= max(seen_rounds)
    print(f"{len(seen_rounds)} reads, {retried_reads} needed a retry")



def test_walks_slower_than_the_writer_fall_back_to_a_copy(snapdb: Snapdb, tmp_path: Path) -> None:
    """A walk that always outlasts the writer's commit interval can never see an unchanged txid
    (a loaded machine, a big database); reading from one pread copy of the file still succeeds."""
    db = tmp_path / "metadata.db"
    stop = tmp_path / "stop"
    writer = snapdb.churn(db, stop, rounds=2000, pause_ms=4)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(0.05)  # a few commits in

        def slow_visit(tx: bolt.Tx) -> SnapshotTable:
            time.sleep(0.1)  # 25 commit intervals: a live walk cannot win
            return store._read_table(tx)

        stats: dict[str, int] = {}
        table, txid = bolt.read_consistent(db, slow_visit, stats=stats)
        assert stats["attempts"] > bolt.LIVE_WALK_ATTEMPTS and txid > 0
        assert _check_consistent(table) >= 0
    finally:
        stop.touch()
        writer.wait(timeout=30)

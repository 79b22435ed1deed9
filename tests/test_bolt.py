"""The lock-free bbolt reader against databases written by real bbolt (via containerd's storage)."""

from __future__ import annotations

import fcntl
import os
import random
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.gohelper import Snapdb, image_chain_ops
from support.paths import VENV_BIN

from stargzfs.errors import FormatError, StargzfsError
from stargzfs.snapshots import bolt

SEED = 20240605


def dump_bucket(bucket: bolt.Bucket, depth: int = 0) -> dict[str, Any]:
    """Same shape as `snapdb dump`: hex keys/values, nested buckets, sequences."""
    assert depth < 16
    values: dict[str, str] = {}
    buckets: dict[str, Any] = {}
    for key, value, is_bucket in bucket.entries():
        if is_bucket:
            buckets[key.hex()] = dump_bucket(bucket.open(key, value), depth + 1)
        else:
            values[key.hex()] = value.hex()
    return {"sequence": bucket.sequence, "values": values, "buckets": buckets}


def python_dump(db: Path) -> tuple[dict[str, Any], set[int]]:
    """(dump, pages visited) of one consistent read."""
    visited: set[int] = set()

    def visit(tx: bolt.Tx) -> dict[str, Any]:
        tree = dump_bucket(tx.root())
        visited.update(tx.visited)
        return {"txid": tx.meta.txid, "root": tree}

    result, _ = bolt.read_consistent(db, visit)
    return result, visited


@pytest.fixture(scope="module")
def varied_db(snapdb: Snapdb, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chains, big (overflow) labels, views, removals in several transactions."""
    db = tmp_path_factory.mktemp("bolt-varied") / "metadata.db"
    big = {f"test/big-{i}": chr(ord("a") + i) * (3000 + 1000 * i) for i in range(4)}
    snapdb.apply(
        db,
        [
            list(image_chain_ops("registry.local/app:v1", 30)),
            list(image_chain_ops("registry.local/big:v1", 3, label_extra=big)),
            [
                {"op": "active", "key": "k8s.io/9/container", "parent": "sha256:registry.local-app:v1-0029"},
                {"op": "view", "key": "k8s.io/9/view", "parent": "sha256:registry.local-big:v1-0002",
                 "labels": {"x": "y"}},
                {"op": "active", "key": "doomed-1"},
                {"op": "active", "key": "doomed-2", "labels": big},
            ],
            [{"op": "remove", "key": "doomed-1"}, {"op": "remove", "key": "doomed-2"}],
        ],
    )
    return db


def test_tree_equals_bbolt_for_varied_db(snapdb: Snapdb, varied_db: Path) -> None:
    ours, visited = python_dump(varied_db)
    assert ours == snapdb.dump(varied_db)
    assert len(visited) > 30  # the walk really went through page trees, not only inline buckets
    data = varied_db.read_bytes()
    page_size = os.sysconf("SC_PAGE_SIZE")
    overflows = [struct.unpack_from("<I", data, pgid * page_size + 12)[0] for pgid in visited]
    assert max(overflows) >= 1  # the big labels really live on overflow pages


def test_tree_equals_bbolt_for_10k_snapshots(snapdb: Snapdb, many_snapshots_db: Path) -> None:
    ours, _ = python_dump(many_snapshots_db)
    assert ours == snapdb.dump(many_snapshots_db)
    snapshots = ours["root"]["buckets"][b"v1".hex()]["buckets"][b"snapshots".hex()]
    assert len(snapshots["buckets"]) == 10_000 and snapshots["sequence"] == 10_000  # Commit keeps the active id


def test_10k_db_has_multi_level_branches(many_snapshots_db: Path) -> None:
    """Guards the fixture: the 'snapshots' bucket must need branch pages above branch pages."""
    with open(many_snapshots_db, "rb") as db:
        meta = bolt.read_meta(db.fileno(), many_snapshots_db)
        levels = 0
        tx = bolt.Tx(db.fileno(), many_snapshots_db, meta)
        snapshots = tx.root().bucket(b"v1").bucket(b"snapshots")  # type: ignore[union-attr]
        pgid = snapshots.root_pgid
        while True:  # descend by first child, counting branch levels
            flags, _, data = tx.page(pgid, snapshots)
            if flags != bolt.BRANCH_PAGE:
                break
            levels += 1
            _, _, pgid = struct.unpack_from("<IIQ", data, bolt.PAGE_HEADER_SIZE)
    assert levels >= 2


def test_reads_while_bbolt_holds_the_exclusive_lock(snapdb: Snapdb, varied_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "metadata.db"
    db.write_bytes(varied_db.read_bytes())
    writer = snapdb.churn(db, tmp_path / "stop", rounds=1_000_000, pause_ms=50)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        with open(db, "rb") as probe:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        tree, _ = python_dump(db)
        assert b"v1".hex() in tree["root"]["buckets"]
    finally:
        (tmp_path / "stop").touch()
        writer.wait(timeout=30)


def _copy(source: Path, target: Path, mutate: Any = None) -> Path:
    data = bytearray(source.read_bytes())
    if mutate is not None:
        data = mutate(data)
    target.write_bytes(bytes(data))
    return target


def test_newest_meta_wins_and_a_corrupt_one_falls_back(varied_db: Path, tmp_path: Path) -> None:
    original, _ = python_dump(varied_db)
    page_size = os.sysconf("SC_PAGE_SIZE")
    newest_page = original["txid"] % 2  # bbolt writes meta txid T to page T % 2

    def break_newest(data: bytearray) -> bytearray:
        data[newest_page * page_size + 16 + 40] ^= 0xFF  # inside the pgid field → checksum mismatch
        return data

    fallback, _ = python_dump(_copy(varied_db, tmp_path / "fallback.db", break_newest))
    assert fallback["txid"] == original["txid"] - 1
    # The previous transaction (the two removals) had not happened yet.
    snapshots = fallback["root"]["buckets"][b"v1".hex()]["buckets"][b"snapshots".hex()]["buckets"]
    assert b"doomed-1".hex() in snapshots


def test_page_size_is_probed_when_meta_zero_is_broken(varied_db: Path, tmp_path: Path) -> None:
    def break_meta0(data: bytearray) -> bytearray:
        data[16:20] = b"\0\0\0\0"  # magic
        return data

    db = _copy(varied_db, tmp_path / "meta0.db", break_meta0)
    tree, _ = python_dump(db)
    assert tree["txid"] % 2 == 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"SQLite format 3\0" + bytes(8192), "not a valid bbolt database"),
        (b"\x00" * 65536, "not a valid bbolt database"),
    ],
)
def test_not_bbolt_files_are_rejected(tmp_path: Path, content: bytes, message: str) -> None:
    db = tmp_path / "metadata.db"
    db.write_bytes(content)
    with pytest.raises(FormatError, match=message):
        bolt.read_consistent(db, lambda tx: tx.root().entries())


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(bolt.DatabaseMissingError, match="no such file"):
        bolt.read_consistent(tmp_path / "absent.db", lambda tx: None)
    with pytest.raises(FormatError, match="not a regular file"):
        bolt.read_consistent(tmp_path, lambda tx: None)


def test_both_metas_broken(varied_db: Path, tmp_path: Path) -> None:
    page_size = os.sysconf("SC_PAGE_SIZE")

    def break_both(data: bytearray) -> bytearray:
        data[16 + 60] ^= 1
        data[page_size + 16 + 60] ^= 1
        return data

    with pytest.raises(FormatError, match="checksum mismatch"):
        python_dump(_copy(varied_db, tmp_path / "both.db", break_both))


def _outcome(db: Path) -> dict[str, Any] | StargzfsError:
    try:
        return python_dump(db)[0]
    except StargzfsError as exc:
        return exc


def test_truncation_at_random_offsets(varied_db: Path, tmp_path: Path) -> None:
    original = varied_db.read_bytes()
    expected, visited = python_dump(varied_db)
    page_size = os.sysconf("SC_PAGE_SIZE")
    needed = (max(visited) + 1) * page_size
    rng = random.Random(SEED)
    offsets = sorted({rng.randrange(1, needed) for _ in range(40)} | {1, 17, page_size + 8, needed - 1})
    for offset in offsets:
        db = tmp_path / "truncated.db"
        db.write_bytes(original[:offset])
        outcome = _outcome(db)
        assert isinstance(outcome, FormatError), f"truncated at {offset}: {outcome!r:.200}"
        assert "\n" not in str(outcome)
    db.write_bytes(original[:needed])  # only the unused tail cut: still the same tree
    assert _outcome(db) == expected


def _structural_targets(db: Path) -> dict[str, list[int]]:
    """Byte offsets of page ids, flags, counts, element positions and child pgids of live pages."""
    _, visited = python_dump(db)
    data = db.read_bytes()
    page_size = os.sysconf("SC_PAGE_SIZE")
    targets: dict[str, list[int]] = {"branch": [], "leaf": []}
    for pgid in sorted(visited):
        base = pgid * page_size
        _, flags, count, _ = struct.unpack_from("<QHHI", data, base)
        kind = "branch" if flags == bolt.BRANCH_PAGE else "leaf"
        targets[kind] += [base + 1, base + 8, base + 10]  # id, flags, count
        for index in range(count):
            element = base + 16 + 16 * index
            if kind == "branch":
                targets[kind] += [element + 8, element + 12]  # child pgid (low and high bytes)
            else:
                targets[kind] += [element + 4 + 3, element + 8 + 3]  # pos, ksize (high bytes)
    return targets


@pytest.mark.parametrize("kind", ["branch", "leaf"])
def test_flipped_structural_bytes_give_clear_errors(
    many_snapshots_db: Path, varied_db: Path, tmp_path: Path, kind: str
) -> None:
    source = many_snapshots_db if kind == "branch" else varied_db
    targets = _structural_targets(source)[kind]
    rng = random.Random(f"{SEED}-{kind}")
    original = source.read_bytes()
    for offset in rng.sample(targets, 8):
        data = bytearray(original)
        data[offset] ^= 0xA5
        db = tmp_path / f"flipped-{kind}.db"
        db.write_bytes(bytes(data))
        outcome = _outcome(db)
        assert isinstance(outcome, FormatError), f"flip at {offset}: {outcome!r:.200}"


def test_random_flips_anywhere_never_escape_as_other_errors(varied_db: Path, tmp_path: Path) -> None:
    """bbolt has no page checksums: a flip in a value is invisible, but nothing may crash or hang."""
    _, visited = python_dump(varied_db)
    page_size = os.sysconf("SC_PAGE_SIZE")
    rng = random.Random(f"{SEED}-anywhere")
    original = varied_db.read_bytes()
    pages = sorted(visited | {0, 1})
    errors = 0
    for _ in range(60):
        pgid = rng.choice(pages)
        data = bytearray(original)
        offset = pgid * page_size + rng.randrange(0, 256)
        data[offset] ^= 1 << rng.randrange(8)
        db = tmp_path / "flipped.db"
        db.write_bytes(bytes(data))
        outcome = _outcome(db)  # any non-StargzfsError exception fails the test here
        errors += isinstance(outcome, StargzfsError)
    assert errors > 0


def test_cycle_between_pages_is_reported(varied_db: Path, tmp_path: Path) -> None:
    """A child pointer aimed at an already visited page must not loop."""
    _, visited = python_dump(varied_db)
    with open(varied_db, "rb") as db:
        meta = bolt.read_meta(db.fileno(), varied_db)
    page_size = meta.page_size
    data = bytearray(varied_db.read_bytes())
    # Point the "v1" bucket header (a leaf value in the root page) at the root page itself.
    root = meta.root_pgid * page_size
    _, _, count, _ = struct.unpack_from("<QHHI", data, root)
    flags, pos, ksize, _ = struct.unpack_from("<IIII", data, root + 16)
    assert count == 1 and flags == bolt.BUCKET_LEAF_FLAG
    value = root + 16 + pos + ksize
    struct.pack_into("<Q", data, value, meta.root_pgid)
    db = tmp_path / "cycle.db"
    db.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="referenced twice"):
        python_dump(db)


def test_fnv1a64_matches_reference_vectors() -> None:
    assert bolt.fnv1a64(b"") == 0xCBF29CE484222325
    assert bolt.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert bolt.fnv1a64(b"foobar") == 0x85944171F73967E8


@pytest.mark.parametrize("overflow", [2**31, 2**32 - 1])
def test_counts_no_file_could_hold_never_size_a_read(varied_db: Path, tmp_path: Path, overflow: int) -> None:
    """Page counts come from the file: one that would size a read past any memory is refused
    from the file size, before anything is allocated (MemoryError/OverflowError before)."""
    page_size = os.sysconf("SC_PAGE_SIZE")
    _, visited = python_dump(varied_db)
    leaf = max(visited)

    def claim(data: bytearray) -> bytearray:
        for page in (0, 1):  # a high-water mark to match, with valid checksums
            base = page * page_size + bolt.PAGE_HEADER_SIZE
            fields = list(bolt._META.unpack_from(data, base))
            fields[7] = 2**62 // page_size
            fields[9] = bolt.fnv1a64(bolt._META.pack(*fields)[:56])
            bolt._META.pack_into(data, base, *fields)
        struct.pack_into("<I", data, leaf * page_size + 12, overflow)  # the page's overflow count
        return data

    db = _copy(varied_db, tmp_path / "metadata.db", claim)
    for live_attempts in (bolt.LIVE_WALK_ATTEMPTS, 0):  # the live walk, and the walk over a one-pread copy
        try:
            bolt.read_consistent(db, lambda tx: dump_bucket(tx.root()), live_attempts=live_attempts)
        except FormatError as exc:
            assert "truncated or corrupt" in str(exc)
        else:
            raise AssertionError("the corrupt overflow count was not noticed")
    done = subprocess.run([str(VENV_BIN / "stargzfs"), "status", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 5 and "truncated or corrupt" in done.stderr and "Traceback" not in done.stderr

"""`check`: passes good bootstraps, pinpoints each kind of damage, never crashes."""

from __future__ import annotations

import json
import random
import struct

import pytest

from stargzfs.estargz.toc import parse_toc
from stargzfs.rafs.build import BuildResult, build_bootstrap
from stargzfs.rafs.check import check_bootstrap
from stargzfs.rafs.ondisk import EXT_SUPERBLOCK_OFFSET
from support.paths import NYDUS_FIXTURES

LOWER_ID = "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
UPPER_ID = "5aabe268d8139e952bfff14b2dd0f43fcfef4f2c38b63ea782486ce7268d4954"


def build(name: str, blob_id: str) -> BuildResult:
    return build_bootstrap(parse_toc((NYDUS_FIXTURES / f"stargz.index-{name}.json").read_bytes()), blob_id=blob_id)


@pytest.fixture(scope="session")
def lower() -> BuildResult:
    return build("lower", LOWER_ID)


def test_good_bootstrap_with_blob_meta(lower: BuildResult) -> None:
    report = check_bootstrap(lower.bootstrap, {0: lower.blob_meta or b""})
    assert report.ok and not report.warnings
    assert report.blobs == [LOWER_ID] and report.inodes == 19 and report.chunk_indexes == 16
    doc = json.loads(report.to_json())
    assert doc["ok"] is True and doc["errors"] == []
    assert report.to_text().endswith("check: OK")


def test_blob_meta_of_another_layer_is_caught(lower: BuildResult) -> None:
    upper = build("upper", UPPER_ID)
    report = check_bootstrap(lower.bootstrap, {0: upper.blob_meta or b""})
    assert not report.ok
    assert any("does not match the blob table entry" in e for e in report.errors)


def test_blob_meta_entry_mismatch(lower: BuildResult) -> None:
    meta = bytearray(lower.blob_meta or b"")
    word0 = struct.unpack_from("<Q", meta, 16 * 8)[0]
    struct.pack_into("<Q", meta, 16 * 8, word0 + 0x1000)  # shift entry 8's uncompressed offset
    report = check_bootstrap(lower.bootstrap, {0: bytes(meta)})
    assert any("differs between blob.meta entry 8" in e for e in report.errors)


def test_unsorted_dirents(lower: BuildResult) -> None:
    data = lower.bootstrap
    assert data.count(b"root-1root-2") == 1
    report = check_bootstrap(data.replace(b"root-1root-2", b"root-2root-1"))
    assert any("not strictly sorted" in e for e in report.errors)


def test_device_slot_tag_mismatch(lower: BuildResult) -> None:
    data = bytearray(lower.bootstrap)
    data[1408] ^= 0x01
    report = check_bootstrap(bytes(data))
    assert any("device slot tag" in e for e in report.errors)


def test_missing_chunk_record(lower: BuildResult) -> None:
    data = bytearray(lower.bootstrap)
    offset = EXT_SUPERBLOCK_OFFSET + 32  # chunk_table_size
    size = struct.unpack_from("<Q", data, offset)[0]
    struct.pack_into("<Q", data, offset, size - 80)
    report = check_bootstrap(bytes(data))
    assert any("missing from the chunk table" in e for e in report.errors)


def test_unaligned_size_and_truncation(lower: BuildResult) -> None:
    assert any("multiple of 4096" in e for e in check_bootstrap(lower.bootstrap + b"\0").errors)
    for cut in (10, 2000, 9000, 13000):
        report = check_bootstrap(lower.bootstrap[:cut])
        assert not report.ok


def test_random_damage_never_crashes(lower: BuildResult) -> None:
    rng = random.Random(99)
    caught = 0
    for _ in range(300):
        data = bytearray(lower.bootstrap)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(1024, len(data))] = rng.randrange(256)
        report = check_bootstrap(bytes(data), {0: lower.blob_meta or b""})
        caught += not report.ok
    assert caught > 0

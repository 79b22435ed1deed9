"""Bootstrap → tree: our own output round-trips byte for byte, mkfs.erofs images (compact
inodes, shared xattrs, inline dirs) are understood, and corrupt input is a FormatError."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from stargzfs.errors import FormatError
from stargzfs.estargz.toc import parse_toc
from stargzfs.rafs.build import build_bootstrap
from stargzfs.rafs.reader import BootstrapReader, read_bootstrap
from stargzfs.rafs.writer import write_bootstrap
from support.erofs import fsck_erofs
from support.paths import NYDUS_FIXTURES

LOWER_ID = "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"


@pytest.fixture(scope="session")
def lower_bootstrap() -> bytes:
    toc = parse_toc((NYDUS_FIXTURES / "stargz.index-lower.json").read_bytes())
    return build_bootstrap(toc, blob_id=LOWER_ID).bootstrap


@pytest.mark.parametrize("name", ["empty", "lower", "upper"])
def test_fixture_round_trip_is_byte_identical(name: str) -> None:
    toc = parse_toc((NYDUS_FIXTURES / f"stargz.index-{name}.json").read_bytes())
    built = build_bootstrap(toc, blob_id="a" * 64)
    assert write_bootstrap(read_bootstrap(built.bootstrap)) == built.bootstrap


def test_lower_tree_read_back(lower_bootstrap: bytes) -> None:
    image = read_bootstrap(lower_bootstrap)
    assert [b.blob_id for b in image.blobs] == [LOWER_ID]
    assert image.chunk_size == 0x400000 and image.compressor == "gzip" and not image.explicit_uid_gid
    large, copy = image.lookup("/root-large"), image.lookup("/sub/sub-root-large-hardlink")
    assert large is not None and copy is not None
    assert large.link is copy.link is not None and large.nid == copy.nid
    assert [c.compressed_offset for c in large.chunks] == [247, 4356, 8465, 12574]
    assert [c.file_offset for c in large.chunks] == [0, 4194304, 8388608, 12582912]
    sub1 = image.lookup("/sub/sub-1")
    assert sub1 is not None and sub1.xattrs == [(b"user.key-bar", b"value-bar"), (b"user.key-foo", b"value-foo")]
    symlink = image.lookup("/sub/sub-root-large-symlink")
    assert symlink is not None and symlink.symlink == b"../root-large"
    assert image.lookup("/" + "test-😉-name." * 17) is not None


@pytest.fixture(scope="session")
def mkfs_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real plain-EROFS image: compact inodes, an xattr shared by 4 files, a hardlink."""
    work = tmp_path_factory.mktemp("mkfs")
    src = work / "src"
    (src / "a" / "b").mkdir(parents=True)
    for i in range(1, 5):
        (src / f"f{i}").touch()
        os.setxattr(src / f"f{i}", "user.shared", b"1")
    os.setxattr(src / "f1", "user.own", b"x")
    (src / "a" / "b" / "c").touch()
    (src / "sym").symlink_to("f1")
    os.mkfifo(src / "fifo")
    os.link(src / "f2", src / "f2link")
    image = work / "m.img"
    subprocess.run(["mkfs.erofs", "--quiet", "-T0", str(image), str(src)], check=True)
    return image


def test_reads_mkfs_erofs_image(mkfs_image: Path, tmp_path: Path) -> None:
    data = mkfs_image.read_bytes()
    reader = BootstrapReader(data)
    image = read_bootstrap(data)
    assert not reader.inode(reader.sb.root_nid).extended  # mkfs.erofs -T0 writes compact inodes
    paths = {path.decode(): node for path, node in image.walk()}
    assert set(paths) == {"/", "/a", "/a/b", "/a/b/c", "/f1", "/f2", "/f2link", "/f3", "/f4", "/sym", "/fifo"}
    assert paths["/f1"].xattrs == [(b"user.own", b"x"), (b"user.shared", b"1")]
    assert all(paths[f"/f{i}"].xattrs[-1] == (b"user.shared", b"1") for i in range(1, 5))
    assert paths["/f2"].link is paths["/f2link"].link is not None
    assert paths["/sym"].symlink == b"f1"
    # and our writer turns the foreign tree into a RAFS bootstrap fsck.erofs accepts
    out = tmp_path / "rewritten.boot"
    out.write_bytes(write_bootstrap(image))
    proc = fsck_erofs(out)
    assert proc.returncode == 0, proc.stderr
    again = read_bootstrap(out.read_bytes())
    assert {p for p, _ in again.walk()} == {p for p, _ in image.walk()}


def test_truncations_are_format_errors(lower_bootstrap: bytes) -> None:
    for cut in [0, 100, 1100, 1200, 4095, 4096, 8192, 12288, 12300, 16384, 20000]:
        with pytest.raises(FormatError):
            read_bootstrap(lower_bootstrap[:cut])


def test_bad_magic_names_the_problem(lower_bootstrap: bytes) -> None:
    corrupt = bytearray(lower_bootstrap)
    corrupt[1024] ^= 0xFF
    with pytest.raises(FormatError, match="magic"):
        read_bootstrap(bytes(corrupt))


def test_flipped_bytes_never_crash(lower_bootstrap: bytes) -> None:
    """Corrupt inodes/dirents/tables: either a FormatError or a tree, never a traceback."""
    rng = random.Random(1234)
    metadata = list(range(1024, 1700)) + list(range(4096, 4400)) + list(range(12288, 16384)) + \
        list(range(16384, 16384 + 80 * 16))
    failures = 0
    for _ in range(600):
        corrupt = bytearray(lower_bootstrap)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.choice(metadata)] = rng.randrange(256)
        try:
            read_bootstrap(bytes(corrupt))
        except FormatError as exc:
            failures += 1
            assert "\n" not in str(exc)
    assert failures > 100  # the corruptions really hit checked structures

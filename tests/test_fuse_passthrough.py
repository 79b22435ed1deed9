"""The FUSE layer through real mounts: passthrough fidelity, read-only, --rw, escapes, laziness."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stargzfs.fuse.inodes import InodeTable
from support.fusemount import RunningMount, start_mount

BIG_DIR_ENTRIES = 5000
SECRET = b"outside-root-secret\n"


def _build_tree(top: Path) -> None:
    """Files, symlinks, hardlinks, xattrs, a fifo and a 5k-entry dir."""
    top.mkdir(parents=True)
    (top / "small.txt").write_bytes(b"hello stargzfs\n")
    (top / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (top / "empty").write_bytes(b"")
    os.chmod(top / "small.txt", 0o640)
    (top / "sub" / "deeper").mkdir(parents=True)
    (top / "sub" / "deeper" / "leaf").write_text("leaf\n")
    os.symlink("small.txt", top / "rel-link")
    os.symlink("/does/not/exist", top / "dangling")
    os.symlink("sub/deeper", top / "dir-link")
    os.link(top / "small.txt", top / "hard-link")
    os.mkfifo(top / "fifo")
    os.setxattr(top / "small.txt", "user.color", b"blue")
    os.setxattr(top / "small.txt", "user.empty", b"")
    os.setxattr(top / "sub", "user.kind", b"dir")
    big = top / "big"
    big.mkdir()
    for index in range(BIG_DIR_ENTRIES):
        (big / f"entry-{index:05d}").write_bytes(b"")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("passthrough")
    root = base / "root"
    (base / "secret").write_bytes(SECRET)
    outside = base / "outside"
    outside.mkdir()
    (outside / "fs").mkdir()
    (outside / "fs" / "stolen").write_bytes(SECRET)
    _build_tree(root / "snapshots" / "1" / "fs")
    (root / "snapshots" / "2" / "fs").mkdir(parents=True)
    (root / "snapshots" / "2" / "fs" / "two").write_text("2\n")
    # Escape attempts planted by a hostile writer of the snapshot dirs:
    fs1 = root / "snapshots" / "1" / "fs"
    os.symlink("../../../../secret", fs1 / "climb-out")  # relative: from ROOT it hits the secret
    os.symlink(str(base / "secret"), fs1 / "abs-out")
    (root / "snapshots" / "3").mkdir()
    os.symlink(str(outside / "fs"), root / "snapshots" / "3" / "fs")  # symlinked fs dir
    os.symlink(str(outside), root / "snapshots" / "4")  # symlinked snapshot dir
    return {"base": base, "root": root, "fs1": fs1, "fs2": root / "snapshots" / "2" / "fs"}


@pytest.fixture(scope="module")
def ro_mount(tree: dict[str, Path]) -> RunningMount:
    root, base = tree["root"], tree["base"]
    spec = {
        "root": str(root),
        "mountpoint": str(base / "mnt"),
        "tops": {
            "1": str(root / "snapshots/1/fs"),
            "2": str(root / "snapshots/2/fs"),
            "3": str(root / "snapshots/3/fs"),
            "4": str(root / "snapshots/4/fs"),
            "outside": str(base / "outside" / "fs"),
            "dotdot": str(root / "snapshots/1/fs/../../2/fs"),
        },
    }
    running = start_mount(spec, base / "ro-mount.log")
    yield running
    running.stop()


def _walk(top: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), top))
    return sorted(found)


STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_ctime_ns", "st_rdev")


def test_root_lists_only_real_top_dirs_inside_root(ro_mount: RunningMount) -> None:
    # 3 (symlinked fs), 4 (symlinked snapshot dir), outside and dotdot are refused.
    assert sorted(os.listdir(ro_mount.mountpoint)) == ["1", "2"]
    for refused in ("3", "4", "outside", "dotdot", "nope"):
        with pytest.raises(FileNotFoundError):
            os.stat(ro_mount.mountpoint / refused)
    root_stat = os.stat(ro_mount.mountpoint)
    assert stat.S_ISDIR(root_stat.st_mode) and stat.S_IMODE(root_stat.st_mode) == 0o555


def test_tree_stat_and_content_match_direct_access(ro_mount: RunningMount, tree: dict[str, Path]) -> None:
    real, mounted = tree["fs1"], ro_mount.mountpoint / "1"
    names = _walk(real)
    assert _walk(mounted) == names
    for name in names:
        direct, through = os.lstat(real / name), os.lstat(mounted / name)
        for field_name in STAT_FIELDS:
            assert getattr(through, field_name) == getattr(direct, field_name), (name, field_name)
        if stat.S_ISLNK(direct.st_mode):
            assert os.readlink(mounted / name) == os.readlink(real / name)
        elif stat.S_ISREG(direct.st_mode) and not name.startswith("big/"):
            assert hashlib.sha256((mounted / name).read_bytes()).digest() == hashlib.sha256(
                (real / name).read_bytes()
            ).digest()


def test_hardlinks_share_one_stable_inode(ro_mount: RunningMount) -> None:
    mounted = ro_mount.mountpoint / "1"
    first, second = os.stat(mounted / "small.txt"), os.stat(mounted / "hard-link")
    assert first.st_ino == second.st_ino and first.st_nlink == 2
    assert os.stat(mounted / "rel-link").st_ino == first.st_ino  # followed by the kernel
    assert os.stat(mounted / "small.txt").st_ino == first.st_ino


def test_xattrs_pass_through(ro_mount: RunningMount, tree: dict[str, Path]) -> None:
    mounted = ro_mount.mountpoint / "1"
    for name in ("small.txt", "sub", "blob.bin"):
        assert sorted(os.listxattr(mounted / name)) == sorted(os.listxattr(tree["fs1"] / name))
    assert os.getxattr(mounted / "small.txt", "user.color") == b"blue"
    assert os.getxattr(mounted / "small.txt", "user.empty") == b""
    assert os.getxattr(mounted / "sub", "user.kind") == b"dir"
    with pytest.raises(OSError) as missing:
        os.getxattr(mounted / "small.txt", "user.absent")
    assert missing.value.errno == errno.ENODATA


def test_big_directory_streams_every_entry_once(ro_mount: RunningMount) -> None:
    listed = os.listdir(ro_mount.mountpoint / "1" / "big")
    assert len(listed) == BIG_DIR_ENTRIES == len(set(listed))
    assert set(listed) == {f"entry-{i:05d}" for i in range(BIG_DIR_ENTRIES)}
    # Several readers interleaving getdents calls on separate handles see the same set.
    with os.scandir(ro_mount.mountpoint / "1" / "big") as first, os.scandir(
        ro_mount.mountpoint / "1" / "big"
    ) as second:
        seen_first, seen_second = [], []
        for a, b in zip(first, second):
            seen_first.append(a.name)
            seen_second.append(b.name)
        seen_first.extend(e.name for e in first)
        seen_second.extend(e.name for e in second)
    assert sorted(seen_first) == sorted(seen_second) == sorted(listed)


def test_seek_and_pread_match(ro_mount: RunningMount, tree: dict[str, Path]) -> None:
    data = (tree["fs1"] / "blob.bin").read_bytes()
    fd = os.open(ro_mount.mountpoint / "1" / "blob.bin", os.O_RDONLY)
    try:
        for offset, size in ((0, 10), (4095, 2), (1 << 20, 131072 + 7), (len(data) - 5, 100), (len(data) + 10, 5)):
            assert os.pread(fd, size, offset) == data[offset : offset + size]
        os.lseek(fd, 12345, os.SEEK_SET)
        assert os.read(fd, 1000) == data[12345:13345]
    finally:
        os.close(fd)


def test_statfs_passes_through(ro_mount: RunningMount, tree: dict[str, Path]) -> None:
    through, direct = os.statvfs(ro_mount.mountpoint), os.statvfs(tree["root"])
    assert (through.f_bsize, through.f_blocks, through.f_files, through.f_namemax) == (
        direct.f_bsize, direct.f_blocks, direct.f_files, direct.f_namemax,
    )
    assert through.f_flag & os.ST_RDONLY


@pytest.mark.parametrize(
    "action",
    [
        lambda m: os.open(m / "1" / "small.txt", os.O_WRONLY),
        lambda m: os.open(m / "1" / "new-file", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda m: os.mkdir(m / "1" / "new-dir"),
        lambda m: os.mkdir(m / "new-top"),
        lambda m: os.unlink(m / "1" / "empty"),
        lambda m: os.rmdir(m / "1" / "sub"),
        lambda m: os.rename(m / "1" / "empty", m / "1" / "renamed"),
        lambda m: os.symlink("x", m / "1" / "new-link"),
        lambda m: os.link(m / "1" / "empty", m / "1" / "new-hard"),
        lambda m: os.chmod(m / "1" / "small.txt", 0o777),
        lambda m: os.truncate(m / "1" / "small.txt", 0),
        lambda m: os.utime(m / "1" / "small.txt", (1, 1)),
        lambda m: os.setxattr(m / "1" / "small.txt", "user.new", b"x"),
        lambda m: os.removexattr(m / "1" / "small.txt", "user.color"),
        lambda m: os.mknod(m / "1" / "new-fifo", 0o600 | stat.S_IFIFO),
    ],
)
def test_read_only_by_default(ro_mount: RunningMount, tree: dict[str, Path], action) -> None:
    before = _walk(tree["fs1"])
    with pytest.raises(OSError) as refused:
        action(ro_mount.mountpoint)
    assert refused.value.errno == errno.EROFS
    assert _walk(tree["fs1"]) == before
    assert (tree["fs1"] / "small.txt").read_bytes() == b"hello stargzfs\n"


def test_symlinks_are_never_followed_by_the_daemon(ro_mount: RunningMount) -> None:
    mounted = ro_mount.mountpoint / "1"
    assert os.readlink(mounted / "climb-out") == "../../../../secret"
    # Resolved by the kernel relative to the mount, where no secret exists: never from ROOT.
    with pytest.raises(FileNotFoundError):
        (mounted / "climb-out").read_bytes()
    assert os.readlink(mounted / "abs-out").endswith("/secret")
    with pytest.raises(OSError) as loop:
        os.open(mounted / "climb-out", os.O_RDONLY | os.O_NOFOLLOW)
    assert loop.value.errno == errno.ELOOP


def test_renames_during_lookups_never_reach_outside_root(tmp_path: Path) -> None:
    """A writer swaps a real dir with a symlink out of ROOT while readers walk through it."""
    root = tmp_path / "root"
    fs = root / "snapshots" / "1" / "fs"
    (fs / "d").mkdir(parents=True)
    (fs / "d" / "f").write_bytes(b"inside\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_bytes(SECRET)
    # From fs/, ../../../../outside is tmp_path/outside; through MNT/1/ it is nowhere.
    os.symlink("../../../../outside", fs / "evil")
    running = start_mount(
        {"root": str(root), "mountpoint": str(tmp_path / "mnt"), "tops": {"1": str(fs)},
         "entry_timeout": 0, "attr_timeout": 0},
        tmp_path / "race.log",
    )
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(fs / "d", fs / "parked")
            os.rename(fs / "evil", fs / "d")
            os.rename(fs / "d", fs / "evil")
            os.rename(fs / "parked", fs / "d")

    writer = threading.Thread(target=swap)
    writer.start()
    seen: set[bytes] = set()
    try:
        for _ in range(1500):
            try:
                seen.add((running.mountpoint / "1" / "d" / "f").read_bytes())
            except OSError:
                seen.add(b"error")
    finally:
        stop.set()
        writer.join()
        running.stop()
    assert SECRET not in seen
    assert b"inside\n" in seen


def test_rw_writes_land_in_the_real_dir(fuse_mount, tmp_path: Path) -> None:
    root = tmp_path / "root"
    fs = root / "snapshots" / "1" / "fs"
    fs.mkdir(parents=True)
    (fs / "old").write_text("old\n")
    running = fuse_mount({"root": str(root), "mountpoint": str(tmp_path / "mnt"), "rw": True,
                          "tops": {"1": str(fs)}})
    m = running.mountpoint / "1"
    (m / "new.txt").write_text("written through\n")
    with open(m / "new.txt", "r+b") as handle:
        handle.seek(8)
        handle.write(b"THROUGH")
    os.mkdir(m / "dir")
    os.symlink("new.txt", m / "dir" / "link")
    os.link(m / "new.txt", m / "hard")
    os.rename(m / "old", m / "dir" / "moved")
    os.truncate(m / "hard", 15)
    os.chmod(m / "new.txt", 0o600)
    os.utime(m / "new.txt", ns=(1_000_000_000, 2_000_000_000))
    os.setxattr(m / "new.txt", "user.tag", b"v")
    os.mknod(m / "fifo", 0o600 | stat.S_IFIFO)
    assert (fs / "new.txt").read_bytes() == b"written THROUGH"
    assert os.readlink(fs / "dir" / "link") == "new.txt"
    assert os.stat(fs / "hard").st_ino == os.stat(fs / "new.txt").st_ino
    assert (fs / "dir" / "moved").read_text() == "old\n" and not (fs / "old").exists()
    real = os.stat(fs / "new.txt")
    assert stat.S_IMODE(real.st_mode) == 0o600 and real.st_mtime_ns == 2_000_000_000
    assert os.getxattr(fs / "new.txt", "user.tag") == b"v"
    assert stat.S_ISFIFO(os.lstat(fs / "fifo").st_mode)
    os.removexattr(m / "new.txt", "user.tag")
    os.unlink(m / "hard")
    os.unlink(m / "dir" / "link")
    os.unlink(m / "dir" / "moved")
    os.rmdir(m / "dir")
    assert sorted(os.listdir(fs)) == ["fifo", "new.txt"] and os.listxattr(fs / "new.txt") == []
    with pytest.raises(OSError) as top_level:
        os.mkdir(running.mountpoint / "new-top")
    assert top_level.value.errno == errno.EROFS


# --------------------------------------------------------------------------- lazy hooks
def _lazy_root(tmp_path: Path, **spec_extra) -> dict:
    root = tmp_path / "root"
    fs = root / "snapshots" / "1" / "fs"
    fs.mkdir(parents=True)
    for index in range(20):
        (fs / f"plain-{index}").write_text(f"{index}\n")
    (fs / "converting-stargz123").write_text("half-written temp\n")
    spec = {"root": str(root), "mountpoint": str(tmp_path / "mnt"), "tops": {"1": str(fs)},
            "virtual": {"1": ["lazy", "broken", "missing"]}, "fail": {"broken": "EIO", "missing": "ENOENT"},
            "journal": str(tmp_path / "journal")}
    spec.update(spec_extra)
    return spec


def _journal(spec: dict) -> list[str]:
    path = Path(spec["journal"])
    return path.read_text().splitlines() if path.exists() else []


def test_virtual_names_listed_temps_hidden_and_errors_mapped(fuse_mount, tmp_path: Path) -> None:
    spec = _lazy_root(tmp_path)
    running = fuse_mount(spec)
    m = running.mountpoint / "1"
    names = os.listdir(m)
    assert {"lazy", "broken", "missing"} <= set(names)
    assert "converting-stargz123" not in names
    with pytest.raises(FileNotFoundError):
        os.stat(m / "converting-stargz123")
    assert _journal(spec) == []  # listing alone converts nothing
    with pytest.raises(OSError) as broken:
        os.stat(m / "broken")
    assert broken.value.errno == errno.EIO
    with pytest.raises(FileNotFoundError):
        os.stat(m / "missing")
    assert (m / "lazy").read_text() == "materialized 1/lazy\n"
    assert stat.S_IMODE(os.stat(m / "lazy").st_mode) == 0o440
    assert _journal(spec).count("start 1/lazy") == 1
    assert os.listdir(m).count("lazy") == 1


def test_slow_materialize_does_not_block_other_requests(fuse_mount, tmp_path: Path) -> None:
    """Other dirs, the root and already-known names keep answering during a conversion."""
    spec = _lazy_root(tmp_path, delay=3.0)
    other = Path(spec["root"]) / "snapshots" / "2" / "fs"
    other.mkdir(parents=True)
    for index in range(20):
        (other / f"other-{index}").write_text("x" * index)
    spec["tops"]["2"] = str(other)
    running = fuse_mount(spec)
    m = running.mountpoint
    known = [os.stat(m / "1" / f"plain-{index}").st_size for index in range(20)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda: (m / "1" / "lazy").read_text())
        while "start 1/lazy" not in _journal(spec):
            os.sched_yield()
        again = [os.stat(m / "1" / f"plain-{index}").st_size for index in range(20)]
        fresh = [os.stat(m / "2" / f"other-{index}").st_size for index in range(20)]
        contents = (m / "1" / "plain-3").read_text()
        tops = sorted(os.listdir(m))
        # All of that was served while the conversion was still running.
        assert "end 1/lazy" not in _journal(spec)
        assert pending.result(timeout=60) == "materialized 1/lazy\n"
    assert again == known and fresh == list(range(20)) and contents == "3\n" and tops == ["1", "2"]


def test_conversion_holds_up_no_other_name_or_listing_in_its_dir(fuse_mount, tmp_path: Path) -> None:
    """Issue #6: while `lazy` converts (3 s), its own dir keeps answering.

    The kernel serialises LOOKUP and READDIR per directory (libfuse 3.14 never sends
    FUSE_PARALLEL_DIROPS) and READDIRPLUS waits for a name still being looked up, so the
    names used here are ones the kernel has never resolved: each needs a real LOOKUP in
    MNT/1/ while `lazy` is converting.
    """
    spec = _lazy_root(tmp_path, delays={"lazy": 3.0, "quick": 0.1})
    spec["virtual"]["1"].append("quick")
    running = fuse_mount(spec)
    m = running.mountpoint / "1"
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(lambda: (m / "lazy").read_text())
        while "start 1/lazy" not in _journal(spec):
            os.sched_yield()
        fresh = [os.stat(m / f"plain-{index}").st_size for index in range(20)]
        listing = os.listdir(m)
        quick = (m / "quick").read_text()
        meanwhile = _journal(spec)
        assert slow.result(timeout=60) == "materialized 1/lazy\n"
    # Everything above was answered while `lazy` was still converting: its end comes last.
    assert meanwhile == ["start 1/lazy", "start 1/quick", "end 1/quick"]
    assert _journal(spec) == meanwhile + ["end 1/lazy"]
    assert fresh == [len(f"{index}\n") for index in range(20)] and quick == "materialized 1/quick\n"
    assert {"lazy", "quick", "broken", "missing", "plain-0"} <= set(listing)
    # The number the kernel got for the placeholder now stands for the converted file.
    listed = {entry.name: entry.inode() for entry in os.scandir(m)}
    assert os.stat(m / "lazy").st_ino == listed["lazy"] == os.stat(m / "lazy").st_ino
    assert os.stat(m / "quick").st_ino == listed["quick"] != listed["lazy"]


def test_promoted_placeholder_stands_for_the_new_file(tmp_path: Path) -> None:
    """Inode-table bookkeeping behind the test above, including the hard-link corner."""
    table = InodeTable()
    top_dir = os.open(tmp_path, os.O_PATH)
    top = table.adopt(top_dir, os.fstat(top_dir))
    table.ref(top)
    first = table.placeholder(top, "t", "lazy")
    table.ref(first)
    (tmp_path / "lazy").write_text("x")
    fd = os.open(tmp_path / "lazy", os.O_PATH)
    table.promote(first, fd, os.fstat(fd))
    assert first.fd == fd and first.placeholder is None
    again = os.open(tmp_path / "lazy", os.O_PATH)
    assert table.adopt(again, os.fstat(again)) is first  # a later lookup gets the same number
    spare = os.open(tmp_path / "lazy", os.O_PATH)
    table.promote(first, spare, os.fstat(spare))  # a second waiter: no-op, closes its fd
    with pytest.raises(OSError):
        os.fstat(spare)
    # The name disappears and is listed again: a new placeholder, never the old number.
    fresh = table.placeholder(top, "t", "lazy")
    assert fresh is not first and fresh.number != first.number
    # Promoting onto a file another inode already stands for: reads through its own fd.
    table.ref(fresh)
    other = os.open(tmp_path / "lazy", os.O_PATH)
    table.promote(fresh, other, os.fstat(other))
    assert fresh.fd == other and fresh.key is None
    probe = os.open(tmp_path / "lazy", os.O_PATH)
    assert table.adopt(probe, os.fstat(probe)) is first
    table.forget(fresh.number, 1)
    with pytest.raises(OSError):
        os.fstat(other)
    assert table.get(first.number) is first
    table.close_all()


def test_parallel_lookups_of_one_virtual_name(fuse_mount, tmp_path: Path) -> None:
    spec = _lazy_root(tmp_path, delay=1.0)
    running = fuse_mount(spec)
    m = running.mountpoint / "1"
    barrier = threading.Barrier(64)

    def look() -> bytes:
        barrier.wait()
        return (m / "lazy").read_bytes()

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda _: look(), range(64)))
    assert results == [b"materialized 1/lazy\n"] * 64
    assert _journal(spec) == ["start 1/lazy", "end 1/lazy"]


def test_snapshots_appear_and_disappear_without_remount(fuse_mount, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for snapshot in ("1", "2", "3"):
        (root / "snapshots" / snapshot / "fs").mkdir(parents=True)
        (root / "snapshots" / snapshot / "fs" / "id").write_text(snapshot)
    tops_file = tmp_path / "tops.json"
    tops_file.write_text(json.dumps({"1": str(root / "snapshots/1/fs")}))
    running = fuse_mount({"root": str(root), "mountpoint": str(tmp_path / "mnt"), "tops_file": str(tops_file)})
    assert os.listdir(running.mountpoint) == ["1"]
    tops_file.write_text(json.dumps({k: str(root / f"snapshots/{k}/fs") for k in ("2", "3")}))
    assert sorted(os.listdir(running.mountpoint)) == ["2", "3"]
    assert (running.mountpoint / "3" / "id").read_text() == "3"


def test_forgotten_inodes_leave_nothing_behind(tmp_path: Path) -> None:
    """The table is bounded by what the kernel holds, not by every file ever looked up."""
    table = InodeTable()
    for index in range(2000):
        path = tmp_path / f"f{index}"
        path.write_bytes(b"")
        fd = os.open(path, os.O_PATH)
        inode = table.adopt(fd, os.fstat(fd))
        table.ref(inode)
        table.forget(inode.number, 1)
    assert table.known_keys == 0 and len(table) == 1  # only MNT/ itself
    fd = os.open(tmp_path / "f0", os.O_PATH)
    again = table.adopt(fd, os.fstat(fd))
    assert again.number > 2000  # numbers are never reused
    table.close_all()


@pytest.mark.parametrize("fail", [False, True])
def test_the_mount_reports_ready_after_the_providers_warm_up_and_survives_its_failure(
    tree: dict[str, Path], fail: bool
) -> None:
    """`ready` (what `stargzfs mount` returns on) comes after the provider's warm-up, which
    pays one-time costs the first lookup would otherwise pay; a failing warm-up is logged and
    the mount serves anyway."""
    root, base = tree["root"], tree["base"]
    name = "warm-fail" if fail else "warm"
    journal = base / f"{name}.journal"
    spec = {
        "root": str(root), "mountpoint": str(base / f"mnt-{name}"), "journal": str(journal),
        "tops": {"2": str(root / "snapshots/2/fs")}, "warm_up": {"seconds": 0.3, "fail": fail},
    }
    running = start_mount(spec, base / f"{name}.log")
    try:
        lines = journal.read_text().splitlines()
        assert lines == (["warm-up start"] if fail else ["warm-up start", "warm-up end"])
        assert (running.mountpoint / "2" / "two").read_text() == "2\n"
        if fail:
            assert "warm-up failed (the first lookup pays for it instead)" in running.log_text()
    finally:
        running.stop()

"""`stargzfs mount` / `stargzfs umount` end to end, on a metadata.db written by containerd's code."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.fusemount import is_mounted
from support.gohelper import Snapdb, image_chain_ops
from support.paths import VENV_BIN
from support.snapshot_root import pid_alive, wait_pid_gone

STARGZFS = [sys.executable, "-m", "stargzfs.cli"]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*STARGZFS, *args], capture_output=True, text=True, timeout=timeout)


def _daemon_pid(stderr: str) -> int:
    match = re.search(r"daemon pid (\d+)", stderr)
    assert match, stderr
    return int(match.group(1))


@pytest.fixture(scope="module")
def snapshot_root(snapdb: Snapdb, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshotter root: 3 committed layers in metadata.db, each with an fs dir."""
    root = tmp_path_factory.mktemp("cli") / "root"
    root.mkdir()
    snapdb.apply(root / "metadata.db", [list(image_chain_ops("registry.local/demo:v1", 3))])
    for entry in snapdb.list(root / "metadata.db"):
        fs = root / "snapshots" / entry["id"] / "fs"
        fs.mkdir(parents=True)
        (fs / "layer-id").write_text(entry["id"])
    return root


@pytest.fixture
def daemons() -> Iterator[list[tuple[Path, int]]]:
    """(mountpoint, pid) of every background daemon a test starts; all torn down."""
    started: list[tuple[Path, int]] = []
    yield started
    for mountpoint, pid in started:
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        if not wait_pid_gone(pid, 15) and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _mount(root: Path, mountpoint: Path, daemons: list, *extra: str) -> int:
    mountpoint.mkdir(exist_ok=True)
    result = _cli("mount", str(root), str(mountpoint), *extra)
    assert result.returncode == 0, result.stderr
    pid = _daemon_pid(result.stderr)
    daemons.append((mountpoint, pid))
    return pid


def test_background_mount_is_ready_on_return_and_umount_stops_it(
    snapshot_root: Path, tmp_path: Path, daemons: list
) -> None:
    mountpoint = tmp_path / "mnt"
    pid = _mount(snapshot_root, mountpoint, daemons)
    # No polling: the command returned only after the mount was live.
    assert is_mounted(mountpoint)
    ids = sorted(os.listdir(snapshot_root / "snapshots"))
    assert sorted(os.listdir(mountpoint)) == ids
    for snapshot_id in ids:
        assert (mountpoint / snapshot_id / "layer-id").read_text() == snapshot_id
    result = _cli("umount", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mountpoint)
    assert wait_pid_gone(pid)


def test_fusermount_unmount_stops_daemon(snapshot_root: Path, tmp_path: Path, daemons: list) -> None:
    mountpoint = tmp_path / "mnt"
    pid = _mount(snapshot_root, mountpoint, daemons)
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    assert wait_pid_gone(pid)
    assert not is_mounted(mountpoint)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_exits(snapshot_root: Path, tmp_path: Path, daemons: list, signum: int) -> None:
    mountpoint = tmp_path / "mnt"
    pid = _mount(snapshot_root, mountpoint, daemons)
    os.kill(pid, signum)
    assert wait_pid_gone(pid)
    assert not is_mounted(mountpoint)


def test_foreground_serves_until_sigterm(snapshot_root: Path, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "daemon.log"
    process = subprocess.Popen([*STARGZFS, "mount", "-f", "--log-file", str(log), "--log-level", "debug",
                                str(snapshot_root), str(mountpoint)])
    try:
        while not is_mounted(mountpoint):
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        assert len(os.listdir(mountpoint)) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not is_mounted(mountpoint)
        assert "unmounted" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)])


def test_snapshots_added_and_removed_show_without_remount(
    snapdb: Snapdb, tmp_path: Path, daemons: list
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    db = root / "metadata.db"
    snapdb.apply(db, [list(image_chain_ops("registry.local/a:v1", 1))])
    first = snapdb.list(db)[0]
    (root / "snapshots" / first["id"] / "fs").mkdir(parents=True)
    mountpoint = tmp_path / "mnt"
    _mount(root, mountpoint, daemons)
    assert os.listdir(mountpoint) == [first["id"]]
    snapdb.apply(db, [list(image_chain_ops("registry.local/b:v1", 2))])
    added = [e["id"] for e in snapdb.list(db) if e["id"] != first["id"]]
    for snapshot_id in added:
        (root / "snapshots" / snapshot_id / "fs").mkdir(parents=True)
    _wait_for_listing(mountpoint, [first["id"], *added])
    snapdb.apply(db, [[{"op": "remove", "key": first["name"]}]])
    _wait_for_listing(mountpoint, added)
    # A snapshot without an fs dir (not yet prepared) is not shown: once the daemon has seen
    # the removal committed after it, it has seen the new snapshot too.
    snapdb.apply(db, [list(image_chain_ops("registry.local/c:v1", 1))])
    last_added = max(added, key=int)
    removed = next(e["name"] for e in snapdb.list(db) if e["id"] == last_added)
    snapdb.apply(db, [[{"op": "remove", "key": removed}]])
    _wait_for_listing(mountpoint, [i for i in added if i != last_added])


def _wait_for_listing(mountpoint: Path, expected: list[str], timeout: float = 10.0) -> None:
    """The daemon re-reads a changed metadata.db off its event loop, so a listing made right
    after a commit may still show the previous read; the next ones show the new one."""
    deadline = time.monotonic() + timeout
    while sorted(os.listdir(mountpoint)) != sorted(expected):
        assert time.monotonic() < deadline, (sorted(os.listdir(mountpoint)), sorted(expected))
        time.sleep(0.02)


def test_config_file_supplies_root_and_cli_overrides(snapshot_root: Path, tmp_path: Path, daemons: list) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'version = 1\nroot = "{snapshot_root}"\naddress = "/run/x.sock"\n'
        '[daemon]\nfs_driver = "fscache"\nnydusimage_path = ""\n'
        '[cache_manager]\ncache_dir = ""\n[experimental]\nenable_stargz = true\n'
        '[stargzfs]\nrw = false\n'
    )
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = _cli("mount", "--config", str(config), "--fs-driver", "fusedev", str(mountpoint))
    assert result.returncode == 0, result.stderr
    daemons.append((mountpoint, _daemon_pid(result.stderr)))
    assert len(os.listdir(mountpoint)) == 3
    assert _cli("umount", str(mountpoint)).returncode == 0


def _setup_bad(tmp_path: Path, snapshot_root: Path, case: str) -> tuple[list[str], str]:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    if case == "missing root":
        return ["mount", str(tmp_path / "nope"), str(mountpoint)], "does not exist"
    if case == "root is a file":
        (tmp_path / "file").write_text("x")
        return ["mount", str(tmp_path / "file"), str(mountpoint)], "not a directory"
    if case == "no metadata.db":
        (tmp_path / "empty-root").mkdir()
        return ["mount", str(tmp_path / "empty-root"), str(mountpoint)], "metadata.db is missing"
    if case == "corrupt metadata.db":
        (tmp_path / "bad-root").mkdir()
        (tmp_path / "bad-root" / "metadata.db").write_bytes(b"\0" * 8192)
        return ["mount", str(tmp_path / "bad-root"), str(mountpoint)], "metadata.db"
    if case == "mountpoint missing":
        return ["mount", str(snapshot_root), str(tmp_path / "absent")], "does not exist"
    if case == "mountpoint is a file":
        (tmp_path / "mfile").write_text("x")
        return ["mount", str(snapshot_root), str(tmp_path / "mfile")], "not a directory"
    if case == "mountpoint not empty":
        (mountpoint / "stuff").write_text("x")
        return ["mount", str(snapshot_root), str(mountpoint)], "not empty"
    if case == "bad config key":
        (tmp_path / "c.toml").write_text("[stargzfs]\nfrobnicate = 1\n")
        return ["mount", "--config", str(tmp_path / "c.toml"), str(snapshot_root), str(mountpoint)], "stargzfs.frobnicate"
    if case == "bad config type":
        (tmp_path / "c.toml").write_text("[daemon]\nfs_driver = 3\n")
        return ["mount", "--config", str(tmp_path / "c.toml"), str(snapshot_root), str(mountpoint)], "daemon.fs_driver"
    if case == "bad fs driver in config":
        (tmp_path / "c.toml").write_text('[daemon]\nfs_driver = "virtiofs"\n')
        return ["mount", "--config", str(tmp_path / "c.toml"), str(snapshot_root), str(mountpoint)], "fs_driver"
    if case == "zero registry timeout":
        return ["mount", "--registry-timeout", "0", str(snapshot_root), str(mountpoint)], "registry_timeout"
    if case == "negative retries in config":
        (tmp_path / "c.toml").write_text("[stargzfs]\nregistry_retries = -1\n")
        return ["mount", "--config", str(tmp_path / "c.toml"), str(snapshot_root), str(mountpoint)], "registry_retries"
    if case == "fractional retries in config":
        (tmp_path / "c.toml").write_text("[stargzfs]\nregistry_retries = 1.5\n")
        return (["mount", "--config", str(tmp_path / "c.toml"), str(snapshot_root), str(mountpoint)],
                "stargzfs.registry_retries must be an integer")
    if case == "infinite auth timeout":
        return ["mount", "--auth-timeout", "inf", str(snapshot_root), str(mountpoint)], "auth_timeout"
    if case == "NUL byte in a config path":
        (tmp_path / "c.toml").write_text('[cache_manager]\ncache_dir = "/var/cache\\u0000/x"\n')
        return ["mount", "--config", str(tmp_path / "c.toml"), str(snapshot_root), str(mountpoint)], "NUL byte"
    if case == "no root anywhere":
        return ["mount", str(mountpoint)], "no ROOT"
    if case == "umount of a plain dir":
        return ["umount", str(mountpoint)], "not mounted"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "missing root", "root is a file", "no metadata.db", "corrupt metadata.db", "mountpoint missing",
        "mountpoint is a file", "mountpoint not empty", "bad config key", "bad config type",
        "bad fs driver in config", "no root anywhere", "umount of a plain dir", "zero registry timeout",
        "negative retries in config", "fractional retries in config", "infinite auth timeout",
        "NUL byte in a config path",
    ],
)
def test_bad_arguments_fail_cleanly(snapshot_root: Path, tmp_path: Path, case: str) -> None:
    argv, reason = _setup_bad(tmp_path, snapshot_root, case)
    result = _cli(*argv)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and reason in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(tmp_path / "mnt")


def test_second_mount_on_same_mountpoint_is_refused(snapshot_root: Path, tmp_path: Path, daemons: list) -> None:
    mountpoint = tmp_path / "mnt"
    _mount(snapshot_root, mountpoint, daemons)
    again = _cli("mount", str(snapshot_root), str(mountpoint))
    assert again.returncode != 0 and "already a stargzfs mount" in again.stderr
    assert _cli("umount", str(mountpoint)).returncode == 0


def test_console_scripts_are_installed() -> None:
    assert (VENV_BIN / "stargzfs").exists()
    result = subprocess.run([str(VENV_BIN / "stargzfs"), "umount", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "MOUNTPOINT" in result.stdout


def test_registry_settings_defaults_config_and_cli(tmp_path: Path) -> None:
    from stargzfs.cli import build_parser
    from stargzfs.commands.mount import settings_from_args

    def settings(*argv: str):  # type: ignore[no-untyped-def]
        return settings_from_args(build_parser().parse_args(["mount", *argv, "/r", "/m"]))

    default = settings()
    assert (default.registry_timeout, default.registry_retries, default.auth_timeout) == (10.0, 3, 10.0)
    config = tmp_path / "c.toml"
    config.write_text("[stargzfs]\nregistry_timeout = 2.5\nregistry_retries = 1\nauth_timeout = 4\n")
    from_file = settings("--config", str(config))
    assert (from_file.registry_timeout, from_file.registry_retries, from_file.auth_timeout) == (2.5, 1, 4.0)
    overridden = settings("--config", str(config), "--registry-timeout", "1", "--registry-retries", "0",
                          "--auth-timeout", "0.5")
    assert (overridden.registry_timeout, overridden.registry_retries, overridden.auth_timeout) == (1.0, 0, 0.5)


def test_hosts_dir_min_rate_and_metrics_settings(tmp_path: Path) -> None:
    from stargzfs.cli import build_parser
    from stargzfs.commands.mount import settings_from_args
    from stargzfs.errors import UsageError

    def settings(*argv: str):  # type: ignore[no-untyped-def]
        return settings_from_args(build_parser().parse_args(["mount", *argv, "/r", "/m"]))

    default = settings()
    assert (default.hosts_dir, default.registry_min_rate, default.metrics_address) == (None, 16384.0, None)
    config = tmp_path / "c.toml"
    config.write_text('[remote.mirrors_config]\ndir = "/etc/hosts-dir"\n[metrics]\naddress = ":9110"\n'
                      "[stargzfs]\nregistry_min_rate = 1000\n")
    from_file = settings("--config", str(config))
    assert (from_file.effective_hosts_dir, from_file.registry_min_rate, from_file.metrics_address) == (
        Path("/etc/hosts-dir"), 1000.0, ":9110")
    overridden = settings("--config", str(config), "--hosts-dir", str(tmp_path), "--registry-min-rate", "5",
                          "--metrics-address", "127.0.0.1:9111")
    assert (overridden.hosts_dir, overridden.registry_min_rate, overridden.metrics_address) == (
        tmp_path, 5.0, "127.0.0.1:9111")
    for argv, complaint in [(["--registry-min-rate", "0"], "registry_min_rate"),
                            (["--insecure-registry", "a b"], "insecure registry"),
                            (["--metrics-address", "nohost:"], "metrics address")]:
        with pytest.raises(UsageError, match=complaint):
            settings(*argv)


@pytest.mark.parametrize("where", ["root itself", "a snapshot fs dir", "a symlink into root"])
def test_mountpoint_inside_root_is_refused(snapshot_root: Path, tmp_path: Path, where: str) -> None:
    """Listing ROOT would stat the mount itself: the daemon would hang on its own request."""
    first_fs = snapshot_root / "snapshots" / sorted(os.listdir(snapshot_root / "snapshots"))[0] / "fs"
    if where == "root itself":
        mountpoint = snapshot_root
    elif where == "a snapshot fs dir":
        mountpoint = first_fs
    else:
        mountpoint = tmp_path / "link"
        mountpoint.symlink_to(first_fs, target_is_directory=True)
    result = _cli("mount", str(snapshot_root), str(mountpoint))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "inside ROOT" in lines[0], result.stderr
    assert not is_mounted(mountpoint) and not is_mounted(first_fs)


def test_background_daemon_does_not_keep_its_cwd(snapshot_root: Path, tmp_path: Path, daemons: list) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = subprocess.run([*STARGZFS, "mount", str(snapshot_root), "mnt", "--log-file", "daemon.log"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pid = _daemon_pid(result.stderr)
    daemons.append((mountpoint, pid))
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert (tmp_path / "daemon.log").is_file()  # relative paths were resolved before the chdir
    assert sorted(os.listdir(mountpoint)) == sorted(os.listdir(snapshot_root / "snapshots"))


def test_broken_metadata_db_after_start_keeps_the_last_good_view(
    snapdb: Snapdb, tmp_path: Path, daemons: list
) -> None:
    """metadata.db is re-read off the event loop; a bad re-read is logged, not turned into EIO."""
    root = tmp_path / "root"
    root.mkdir()
    db = root / "metadata.db"
    snapdb.apply(db, [list(image_chain_ops("registry.local/a:v1", 2))])
    ids = [entry["id"] for entry in snapdb.list(db)]
    for snapshot_id in ids:
        (root / "snapshots" / snapshot_id / "fs").mkdir(parents=True)
    mountpoint = tmp_path / "mnt"
    log = tmp_path / "daemon.log"
    _mount(root, mountpoint, daemons, "--log-file", str(log))
    with open(db, "r+b") as handle:  # same inode, both meta pages gone
        handle.write(b"\0" * 8192)
    for _ in range(20):
        assert sorted(os.listdir(mountpoint)) == sorted(ids)
        time.sleep(0.01)
    assert (mountpoint / ids[0]).is_dir()
    assert log.read_text().count("serving the last good read") == 1

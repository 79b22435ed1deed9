"""Mount lifecycle: checks, pyfuse3 init, the trio main loop, signals, background start, unmount.

`serve` runs a mount in the calling process until it is unmounted (fusermount3 -u,
`stargzfs umount`) or gets SIGTERM/SIGINT/SIGHUP. `mount_background` forks, serves in the
child and returns in the parent only once the child reports, over a pipe, that the mount
is live - or raises with the child's reason if it failed first.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from stargzfs.errors import StargzfsError, UsageError
from stargzfs.mountinfo import find_mount
from stargzfs.fuse.ops import PassthroughOperations
from stargzfs.fuse.provider import Provider
from stargzfs.fuse.config import DaemonSettings

log = logging.getLogger(__name__)

FS_NAME = "stargzfs"
FS_TYPE = f"fuse.{FS_NAME}"
MAX_WORKER_TASKS = 512  # one per in-flight request; lookups awaiting a conversion hold one
WARM_UP_TIMEOUT = 10.0  # seconds the mount waits for the provider's warm-up before reporting ready
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class MountError(StargzfsError):
    """The mount could not be set up or torn down (the message says why); exit code 1."""


# --------------------------------------------------------------------------- checks
def check_mountpoint(mountpoint: Path, root: Path | None = None) -> None:
    """A mountpoint must be an existing, empty directory that nothing is mounted on.

    It must not be ROOT or lie inside it: listing ROOT's snapshot dirs would then stat the
    mount itself, and a FUSE daemon waiting on its own mount hangs for good (D state).
    """
    if root is not None:
        real_root, real_mountpoint = os.path.realpath(root), os.path.realpath(mountpoint)
        if os.path.commonpath([real_root, real_mountpoint]) == real_root:
            raise UsageError(f"mountpoint {mountpoint} is inside ROOT {root}: choose a directory outside it")
    entry = find_mount(mountpoint)
    if entry is not None and entry.fstype == FS_TYPE:
        raise MountError(f"{mountpoint} is already a stargzfs mount (stargzfs umount {mountpoint})")
    try:
        names = os.listdir(mountpoint)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mountpoint} does not exist") from None
    except NotADirectoryError:
        raise UsageError(f"mountpoint {mountpoint} is not a directory") from None
    except OSError as exc:
        raise MountError(f"mountpoint {mountpoint} is not usable: {exc.strerror}") from None
    if names:
        raise UsageError(f"mountpoint {mountpoint} is not empty")


def check_root(root: Path) -> None:
    if not root.exists():
        raise UsageError(f"ROOT {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"ROOT {root} is not a directory")


def fuse_options(settings: DaemonSettings) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {f"fsname={FS_NAME}", f"subtype={FS_NAME}"}
    if not settings.rw:
        options.add("ro")
    if os.geteuid() == 0:
        options.add("allow_other")  # containerd, nydusd and users all look at the mount
    for item in settings.fuse_options:
        options.update(opt for opt in item.split(",") if opt)
    if "rw" in options:
        options.discard("ro")
    return options


def raise_fd_limit() -> int:
    """Every inode the kernel holds pins one fd, so allow as many as the system does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if os.geteuid() == 0:
        try:
            target = max(hard, int(Path("/proc/sys/fs/nr_open").read_text()))
        except (OSError, ValueError):
            target = hard
    for limit in (target, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return limit
        except (ValueError, OSError):
            continue
    return soft


READ_AHEAD_KB = 1024


def widen_read_ahead(mountpoint: Path) -> None:
    """Let the kernel send 1 MiB reads: per-request cost dominates a Python daemon.

    The FUSE bdi defaults to 128 KiB of readahead; libfuse already allows 1 MiB requests
    (max_pages 256), so only the bdi knob needs raising. Best effort (root only).
    """
    entry = find_mount(mountpoint)
    if entry is None or not entry.device:
        return
    knob = Path("/sys/class/bdi") / entry.device / "read_ahead_kb"
    try:
        if int(knob.read_text()) < READ_AHEAD_KB:
            knob.write_text(str(READ_AHEAD_KB))
    except (OSError, ValueError) as exc:
        log.debug("cannot raise readahead of %s: %s", mountpoint, exc)


def configure_logging(settings: DaemonSettings) -> None:
    """Concise daemon log: to --log-file if given, else stderr."""
    handler: logging.Handler
    if settings.log_file is not None:
        handler = logging.FileHandler(settings.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LOG_LEVELS.get(settings.log_level, logging.INFO))
    if settings.log_level != "debug":
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- serving
def serve(settings: DaemonSettings, provider: Provider, on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled; always leaves nothing mounted."""
    check_mountpoint(settings.mountpoint, provider.root)
    raise_fd_limit()
    ops = PassthroughOperations(
        provider,
        writable=settings.rw,
        entry_timeout=settings.entry_timeout,
        attr_timeout=settings.attr_timeout,
    )
    try:
        pyfuse3.init(ops, str(settings.mountpoint), fuse_options(settings))
    except RuntimeError as exc:
        ops.close()
        raise MountError(f"cannot mount on {settings.mountpoint}: {exc}") from None
    ops.after_init = lambda: widen_read_ahead(settings.mountpoint)
    log.info("mounted %s on %s (%s)", provider.root, settings.mountpoint, "rw" if settings.rw else "ro")
    try:
        trio.run(_serve_async, ops, on_ready)
    finally:
        pyfuse3.close(unmount=True)
        ops.close()
        log.info("unmounted %s", settings.mountpoint)


async def _serve_async(ops: PassthroughOperations, on_ready: Callable[[], None] | None) -> None:
    async with trio.open_nursery() as nursery:
        work_scope = trio.CancelScope()

        async def run_work(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with work_scope:
                async with trio.open_nursery() as work:
                    ops.attach(work)
                    task_status.started()
                    await trio.sleep_forever()

        await nursery.start(run_work)
        nursery.start_soon(_stop_on_signal, work_scope)
        nursery.start_soon(_ready_when_warm, ops, on_ready)
        await pyfuse3.main(min_tasks=1, max_tasks=MAX_WORKER_TASKS)
        nursery.cancel_scope.cancel()


async def _ready_when_warm(ops: PassthroughOperations, on_ready: Callable[[], None] | None) -> None:
    """"Ready" once the provider's one-time costs are paid (requests are served meanwhile), so
    the first lookup after `stargzfs mount` returns does not pay them; never held up for long."""
    warm_up = getattr(ops.provider, "warm_up", None)
    if warm_up is not None:
        with trio.move_on_after(WARM_UP_TIMEOUT) as scope:
            try:
                await warm_up()
            except Exception as exc:  # noqa: BLE001 - a warm-up is an optimisation: never fatal
                log.warning("warm-up failed (the first lookup pays for it instead): %s: %s",
                            type(exc).__name__, exc)
        if scope.cancelled_caught:
            log.warning("still warming up after %.0f s; reporting ready anyway", WARM_UP_TIMEOUT)
    if on_ready is not None:
        on_ready()


async def _stop_on_signal(work_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got %s, unmounting", signal.Signals(signum).name)
            work_scope.cancel()  # waiting lookups get ENOENT instead of hanging shutdown
            pyfuse3.terminate()
            return


# --------------------------------------------------------------------------- background start
def mount_background(settings: DaemonSettings, provider: Provider) -> int:
    """Fork a daemon serving the mount; return its pid once the mount is live."""
    check_mountpoint(settings.mountpoint, provider.root)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, observed through the mount
        os.close(read_fd)
        os._exit(_daemon_child(settings, provider, write_fd))
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.readline().decode("utf-8", "replace").rstrip("\n")
    if report == "ready":
        return pid
    _, status = os.waitpid(pid, 0)
    if report.startswith("error "):
        code, _, message = report[len("error ") :].partition(" ")
        error = MountError(message)
        error.exit_code = int(code) if code.isdigit() else MountError.exit_code
        raise error
    raise MountError(f"mount daemon exited before the mount was ready (wait status {status})")


def _daemon_child(settings: DaemonSettings, provider: Provider, ready_fd: int) -> int:
    """Body of the forked daemon: detach, serve, report readiness or the failure."""
    reported = False

    def report(line: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            os.write(ready_fd, (line + "\n").encode())
            os.close(ready_fd)

    try:
        os.setsid()
        os.chdir("/")  # keep no directory busy (settings paths are absolute: see build_settings)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        if settings.log_file is None:
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        else:
            log_fd = os.open(settings.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
        os.close(devnull)
        configure_logging(settings)
        serve(settings, provider, on_ready=lambda: report("ready"))
        return 0
    except StargzfsError as exc:
        report(f"error {exc.exit_code} {exc}")
        log.error("%s", exc)
        return exc.exit_code
    except BaseException as exc:  # noqa: BLE001 - the parent must hear about it
        report(f"error 1 {type(exc).__name__}: {exc}")
        log.error("daemon failed: %s: %s", type(exc).__name__, exc)
        return 1


# --------------------------------------------------------------------------- unmount
def unmount(mountpoint: Path) -> None:
    """Unmount a stargzfs mount the way fusermount3 -u does; refuse anything else."""
    entry = find_mount(mountpoint)
    if entry is None:
        raise UsageError(f"{mountpoint} is not mounted")
    if entry.fstype != FS_TYPE:
        raise UsageError(f"{mountpoint} is not a stargzfs mount (it is {entry.fstype})")
    result = subprocess.run(
        ["fusermount3", "-u", str(entry.mountpoint)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise MountError(f"cannot unmount {mountpoint}: {reason}")

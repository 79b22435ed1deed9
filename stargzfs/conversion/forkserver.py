"""A warm builder: one process that imported `stargzfs-image` once and forks a child per job.

Starting a Python builder costs ~0.2 s of imports per layer, more than building a typical
layer's bootstrap; forking a process that has them already costs a few milliseconds. Each
job still runs in a process of its own, under its own RLIMIT_AS/RLIMIT_CPU (a fresh child's
CPU time starts at zero), killed with the server, which is killed with the daemon
(PDEATHSIG), so a hostile TOC can only fail its own conversion, exactly as with a subprocess.

The daemon sends a job (argv, the limits, the numbers its dir fds have in the daemon) with
those fds and a pipe for the output over a SEQPACKET socket; the child puts the fds at the
same numbers, so `/proc/self/fd/<N>/<name>` paths in the argv mean the same as in the
daemon. When a child exits the server sends back its wait status.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from stargzfs import cliutil
from stargzfs.image_cli import PROG

_PR_SET_PDEATHSIG = 1


class ForkServer:
    """The daemon's side: started on first use, restarted if it ever dies."""

    def __init__(self, prefix: Sequence[str] = ()) -> None:
        self._prefix = tuple(prefix)  # e.g. setpriv --pdeathsig KILL
        self._socket: Any = None  # trio socket
        self._process: subprocess.Popen[bytes] | None = None
        self._results: dict[int, int] = {}
        self._next_id = 0
        self._reader: Any = None  # trio.Lock: one task reads the socket at a time
        self._ready_fd = -1  # read end of the pipe the server closes when it is ready

    async def start(self) -> None:
        """Start the server ahead of the first job and wait until it has imported the
        builder (its imports then cost no conversion anything). A server that dies first
        ends the wait too: the next job starts another and reports what went wrong."""
        import trio

        await self._connection()
        ready_fd, self._ready_fd = self._ready_fd, -1
        if ready_fd < 0:
            return
        try:
            await trio.lowlevel.wait_readable(ready_fd)
        finally:
            os.close(ready_fd)

    async def _connection(self) -> Any:
        import trio

        if self._socket is not None and self._process is not None and self._process.poll() is None:
            return self._socket
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
        try:
            # Popen from the trio thread: PDEATHSIG follows the thread that forked (see builder.py)
            self._process = subprocess.Popen(
                [*self._prefix, sys.executable, "-m", "stargzfs.conversion.forkserver", str(theirs.fileno()),
                 str(ready_write)],
                stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(), ready_write), close_fds=True,
            )
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            theirs.close()
            os.close(ready_write)
        if self._ready_fd >= 0:
            os.close(self._ready_fd)
        self._ready_fd = ready_read  # closed by the server once it has imported the builder
        self._socket = trio.socket.from_stdlib_socket(ours)
        self._reader = trio.Lock()
        self._results.clear()
        return self._socket

    async def run(self, argv: Sequence[str], pass_fds: Sequence[int], *, memory_limit: int, cpu_limit: int) -> tuple[int, bytes]:
        """(exit code or -signal, output) of `stargzfs-image ARGV` in a fresh child."""
        import trio

        connection = await self._connection()
        self._next_id += 1
        job_id = self._next_id
        message = json.dumps({
            "id": job_id, "argv": list(argv), "targets": list(pass_fds), "as": memory_limit, "cpu": cpu_limit,
        }).encode()
        read_fd, write_fd = os.pipe()
        try:
            try:
                fds = array.array("i", [write_fd, *pass_fds])
                await connection.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            finally:
                os.close(write_fd)
            output = bytearray()
            async with trio.lowlevel.FdStream(read_fd) as stream:
                read_fd = -1  # the stream owns it now
                while piece := await stream.receive_some(1 << 16):
                    if len(output) < 1 << 20:
                        output += piece
        finally:
            if read_fd >= 0:
                os.close(read_fd)
        return await self._status(job_id), bytes(output)

    async def _status(self, job_id: int) -> int:
        connection = self._socket
        while job_id not in self._results:
            async with self._reader:
                if job_id in self._results:
                    break
                data = await connection.recv(4096) if connection is self._socket else b""
                if not data:
                    self._socket = None  # the next job starts a new server
                    raise OSError(errno.EPIPE, "the builder fork server stopped")
                answer = json.loads(data)
                self._results[answer["id"]] = answer["status"]
        return self._results.pop(job_id)


# ----------------------------------------------------------------------------- the server process
_PARSER: Any = None  # stargzfs-image's parser with every command, built once before any fork


def _preload() -> None:
    """Everything a job imports, imported once before any fork, and the command-line parser
    built once (a child used to build its own: ~2 ms of every conversion)."""
    global _PARSER
    from stargzfs.image_cli import SUBCOMMANDS, build_parser

    for module in set(SUBCOMMANDS.values()):
        __import__(module)
    _PARSER = build_parser([])  # no command named: all of them registered


def _child(connection: socket.socket, wakeup: tuple[int, int], job: dict[str, Any], fds: list[int]) -> None:
    """Become the job: limits, fds at the daemon's numbers, stdout/stderr to its pipe; never returns."""
    code = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        connection.close()
        for fd in wakeup:
            os.close(fd)
        import resource

        if job["as"]:
            resource.setrlimit(resource.RLIMIT_AS, (job["as"], job["as"]))
        if job["cpu"]:
            resource.setrlimit(resource.RLIMIT_CPU, (job["cpu"], job["cpu"]))
        targets = [1, *job["targets"]]
        floor = max(targets) + 1
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in fds]
        for fd in fds:
            os.close(fd)
        for fd, target in zip(moved, targets):
            os.dup2(fd, target)
        os.dup2(1, 2)
        for fd in moved:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        cliutil.exit_without_teardown()  # the finally below ends this child with exit_now
        code = cliutil.run(_PARSER, job["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 - the daemon needs a line and a status
        print(f"{PROG}: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        # as the console script ends: output that cannot be flushed is a failed job, not a 0
        cliutil.exit_now(code, PROG)


def serve(connection: socket.socket, ready_fd: int = -1) -> None:
    _preload()
    # Every object so far is shared with each child; the cyclic GC walking them would write
    # to (and so copy) every page of the server's heap in every child.
    gc.freeze()
    if ready_fd >= 0:
        os.close(ready_fd)  # EOF on the daemon's end: ready
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    children: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([connection, wakeup_read], [], [])
        if wakeup_read in ready:
            os.read(wakeup_read, 4096)
        if connection in ready:
            try:
                message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 256)
            except OSError:
                message, fds = b"", []
            if not message:
                return  # the daemon is gone (its children die with us: PDEATHSIG)
            job = json.loads(message)
            pid = os.fork()
            if pid == 0:
                _child(connection, (wakeup_read, wakeup_write), job, fds)
            for fd in fds:
                os.close(fd)
            children[pid] = job["id"]
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            job_id = children.pop(pid, None)
            if job_id is not None:
                answer = {"id": job_id, "status": os.waitstatus_to_exitcode(status)}
                connection.send(json.dumps(answer).encode())


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]) if len(sys.argv) > 2 else -1)

"""A real loopback docker-registry (distribution 2.8.2) for tests, with a parsed access log.

It can serve HTTPS (`tls=RegistryTls(...)`, certificates from support.pki, optionally requiring a
client certificate) and run as a pull-through cache of another registry (`proxy_remote=URL`).

The registry writes its access log (gorilla combined log format) to stdout and its application log to
stderr; we redirect them to two files in the work dir. Tests use the access log as the oracle for
"which bytes did the lazy filesystem really fetch".
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REGISTRY_BINARY = "docker-registry"
HTPASSWD_REALM = "stargzfs-test"
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
_SYNC_QUERY = "stargzfs-log-sync"

# 127.0.0.1 - - [29/Nov/2026:14:49:44 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
_ACCESS_LINE = re.compile(
    r'^(?P<remote>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]*)\] '
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?'
)


@dataclass(frozen=True)
class RegistryTls:
    """HTTPS for a test registry: its certificate and key, the CAs a client certificate must chain
    to (none: no client certificate asked for), and how the tests' own requests trust it."""

    cert: Path
    key: Path
    trust: ssl.SSLContext
    client_cas: tuple[Path, ...] = ()


@dataclass(frozen=True)
class AccessRecord:
    """One line of the registry's access log."""

    method: str
    path: str  # request path without the query string
    status: int
    bytes: int  # response body bytes written (0 when the log says "-")
    query: str = ""
    user_agent: str = ""


def parse_access_log(text: str) -> list[AccessRecord]:
    """Parse combined-log-format lines; lines that are not access records (partial writes) are skipped."""
    records: list[AccessRecord] = []
    for line in text.splitlines():
        match = _ACCESS_LINE.match(line)
        if match is None:
            continue
        path, _, query = match["uri"].partition("?")
        size = match["bytes"]
        records.append(
            AccessRecord(
                method=match["method"],
                path=path,
                status=int(match["status"]),
                bytes=0 if size == "-" else int(size),
                query=query,
                user_agent=match["agent"] or "",
            )
        )
    return records


def free_port() -> int:
    """A currently unused loopback port (the registry may still lose a race for it; start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def die_with_parent_hook() -> Callable[[], None] | None:
    """preexec_fn that SIGTERMs the child when the test process dies, so no daemon outlives a crash.

    The kernel ties PDEATHSIG to the forking *thread*; from a worker thread (trio.to_thread) the daemon
    would die with that thread, so the hook is only used from the main thread.
    """
    return _die_with_parent if threading.current_thread() is threading.main_thread() else None


class DaemonStartError(RuntimeError):
    """A test daemon exited while starting or was not ready in time; `.log_tail` is its stderr's end."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a daemon's log on one line, for error messages."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Terminate and reap one child of ours; SIGKILL when it outlives `timeout`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def spawn_daemon(
    argv: list[str], stdout_path: Path, stderr_path: Path, *, ready: Callable[[], bool], readiness: str,
    timeout: float,
) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session with its output appended to log files; return it once
    `ready()` holds. Raises DaemonStartError when it exits first, or (after stopping it) when
    `timeout` passes; `readiness` says what was awaited ("open /x/sock")."""
    name = Path(argv[0]).name
    with open(stdout_path, "ab") as stdout, open(stderr_path, "ab") as stderr:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,  # both O_APPEND: the same file for both streams interleaves cleanly
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_tail(stderr_path)
            raise DaemonStartError(f"{name} exited at start: {tail}", tail)
        if ready():
            return process
        time.sleep(0.02)
    stop_process(process, _STOP_TIMEOUT_S)
    raise DaemonStartError(f"{name} did not {readiness} within {timeout}s", log_tail(stderr_path))


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    """Write a one-user bcrypt htpasswd file that docker-registry accepts.

    Uses glibc/libxcrypt crypt(3) `$2b$` through the stdlib `crypt` module, so no extra package is
    needed (distribution's bcrypt accepts 2a/2b/2y). Cost 4 (the minimum) keeps logins fast.
    """
    if ":" in user or "\n" in user or "\n" in password:
        raise ValueError("htpasswd user must not contain ':' or newlines")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # noqa: PLC0415 - deprecated stdlib module, still present in 3.11/3.12

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("crypt(3) on this system cannot produce bcrypt hashes")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{user}:{hashed}\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


class RegistryProcess:
    """A docker-registry (distribution 2.8) on 127.0.0.1:<free port>, storage in workdir."""

    def __init__(
        self,
        workdir: Path,
        *,
        htpasswd: Path | None = None,
        token_auth: dict | None = None,
        tls: RegistryTls | None = None,
        proxy_remote: str | None = None,
    ) -> None:
        if htpasswd is not None and token_auth is not None:
            raise ValueError("choose either htpasswd or token_auth, not both")
        self.tls = tls
        self.proxy_remote = proxy_remote
        if token_auth is not None:
            missing = {"realm", "service", "issuer", "rootcertbundle"} - set(token_auth)
            if missing:
                raise ValueError(f"token_auth lacks {sorted(missing)}")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "config.yml"
        self.access_log_path = self.workdir / "access.log"
        self.error_log_path = self.workdir / "registry.log"
        self.htpasswd = htpasswd
        self.token_auth = dict(token_auth) if token_auth is not None else None
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._sync_counter = itertools.count()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RegistryProcess {self.host} {state}>"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.host}"

    def _get(self, path: str, timeout: float) -> httpx.Response:
        """The tests' own request to this registry (trusting its test CA when it serves HTTPS)."""
        verify: ssl.SSLContext | bool = self.tls.trust if self.tls is not None else True
        return httpx.get(f"{self.url}{path}", timeout=timeout, verify=verify)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    def _config(self) -> dict:
        config: dict = {
            "version": "0.1",
            # level error keeps stderr quiet; the access log is separate and always on.
            "log": {"level": "error", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": "stargzfs-test-only-secret"},
        }
        if self.tls is not None:
            tls: dict = {"certificate": str(self.tls.cert), "key": str(self.tls.key)}
            if self.tls.client_cas:
                tls["clientcas"] = [str(path) for path in self.tls.client_cas]
            config["http"]["tls"] = tls
        if self.proxy_remote is not None:
            config["proxy"] = {"remoteurl": self.proxy_remote}
        if self.htpasswd is not None:
            config["auth"] = {"htpasswd": {"realm": HTPASSWD_REALM, "path": str(self.htpasswd)}}
        elif self.token_auth is not None:
            config["auth"] = {"token": {key: str(value) for key, value in self.token_auth.items()}}
        return config

    def _write_config(self) -> None:
        # JSON is valid YAML, so no YAML library is needed.
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        tmp.write_text(json.dumps(self._config(), indent=2))
        tmp.replace(self.config_path)

    def start(self) -> None:
        """Start and wait until GET /v2/ answers (200 or 401). Idempotent; keeps the port on restart."""
        if self.running:
            return
        if shutil.which(REGISTRY_BINARY) is None:
            raise RuntimeError(f"{REGISTRY_BINARY} not found (apt-get install docker-registry)")
        if self.htpasswd is not None and not Path(self.htpasswd).is_file():
            # distribution would silently create one with a random password for user "docker".
            raise FileNotFoundError(f"htpasswd file {self.htpasswd} does not exist")
        first_start = not self.access_log_path.exists()
        attempts = 5 if first_start else 1
        last_error = ""
        for _ in range(attempts):
            try:
                self._spawn_and_wait()
                return
            except _PortTaken as taken:
                last_error = str(taken)
                self.port = free_port()  # only before anyone has seen our port
        raise RuntimeError(f"docker-registry could not bind a port: {last_error}")

    def _spawn_and_wait(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        try:
            self._process = spawn_daemon(
                [REGISTRY_BINARY, "serve", str(self.config_path)], self.access_log_path, self.error_log_path,
                ready=self._answers, readiness=f"answer on {self.url}", timeout=_START_TIMEOUT_S,
            )
        except DaemonStartError as failed:
            if "address already in use" in failed.log_tail:
                raise _PortTaken(failed.log_tail) from None
            raise

    def _answers(self) -> bool:
        try:
            return self._get("/v2/", 1.0).status_code in (200, 401)
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        """Terminate and reap only our own process."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, _STOP_TIMEOUT_S)

    def set_auth(self, *, htpasswd: Path | None = None, token_auth: dict | None = None) -> None:
        """Switch auth mode (None/None = anonymous); restarts on the same port and data if running.

        Lets a test push anonymously (ctr-remote never sees a password) and then serve with auth.
        """
        if htpasswd is not None and token_auth is not None:
            raise ValueError("choose either htpasswd or token_auth, not both")
        was_running = self.running
        self.stop()
        self.htpasswd = htpasswd
        self.token_auth = dict(token_auth) if token_auth is not None else None
        if was_running:
            self.start()

    def seed_from(self, other: RegistryProcess) -> None:
        """Copy another registry's stored repositories and blobs (only before our first start)."""
        if self.running or self.access_log_path.exists():
            raise RuntimeError("seed_from() must be called before the registry is first started")
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        # Real copies, not hardlinks: the filesystem driver rewrites tag links in place.
        shutil.copytree(other.data_dir, self.data_dir)

    def blob_path(self, digest: str) -> Path:
        """On-disk file of a stored blob (filesystem driver layout)."""
        algorithm, _, hex_digest = digest.partition(":")
        if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return (
            self.data_dir / "docker" / "registry" / "v2" / "blobs" / "sha256"
            / hex_digest[:2] / hex_digest / "data"
        )

    def _sync_log(self) -> None:
        """Make earlier requests' log lines visible.

        The registry writes a line only after its handler returns, i.e. possibly after the client already
        has the response. A marker request whose own line we wait for acts as a barrier.
        """
        if not self.running:
            return
        marker = f"{_SYNC_QUERY}={os.getpid()}-{next(self._sync_counter)}"
        try:
            self._get(f"/v2/?{marker}", 5.0)
        except httpx.TransportError:
            return
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if marker.encode() in self.access_log_path.read_bytes():
                return
            time.sleep(0.005)

    def access_log(self) -> list[AccessRecord]:
        """Parsed access log of every start so far, in order, without our own sync requests."""
        self._sync_log()
        try:
            text = self.access_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [record for record in parse_access_log(text) if _SYNC_QUERY not in record.query]

    def mark(self) -> int:
        """Current access-log length, for `since=`."""
        return len(self.access_log())

    def requests_for(self, digest: str, since: int = 0) -> list[AccessRecord]:
        """GET/HEAD requests of that blob (any repository) after `since`."""
        suffix = f"/blobs/{digest}"
        return [
            record
            for record in self.access_log()[since:]
            if record.method in ("GET", "HEAD") and record.path.endswith(suffix)
        ]


class _PortTaken(RuntimeError):
    """Someone else grabbed our free port between probe and bind."""


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """One anonymous registry shared by the whole session."""
    process = RegistryProcess(tmp_path_factory.mktemp("registry"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def registry_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RegistryProcess]]:
    """`registry_factory(htpasswd=..., token_auth=..., seed_from=..., tls=..., proxy_remote=...)` -> started
    private registry.

    `seed_from=registry` copies the images already pushed there (e.g. cached ones) so an auth test can
    serve them without pushing with credentials. Stopped at teardown.
    """
    started: list[RegistryProcess] = []

    def make(
        *,
        htpasswd: Path | None = None,
        token_auth: dict | None = None,
        seed_from: RegistryProcess | None = None,
        tls: RegistryTls | None = None,
        proxy_remote: str | None = None,
    ) -> RegistryProcess:
        process = RegistryProcess(
            tmp_path_factory.mktemp("registry"), htpasswd=htpasswd, token_auth=token_auth, tls=tls,
            proxy_remote=proxy_remote,
        )
        started.append(process)
        if seed_from is not None:
            process.seed_from(seed_from)
        process.start()
        return process

    try:
        yield make
    finally:
        for process in started:
            process.stop()

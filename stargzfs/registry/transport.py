"""What every registry request shares: deadlines that hold, failures classified per host, and the
pooled HTTP clients (one per TLS configuration) with cookies off and counted answers.

Deadlines: a request to one host must answer within `timeout`, each silence in its body is at
most `timeout` (the idle deadline, so a stall is caught early), and the whole transfer must end
within `timeout + bytes / min_rate` (the overall deadline, so a server trickling one byte at a
time cannot hold a conversion forever).
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookiejar import CookieJar, DefaultCookiePolicy

import anyio
import httpx

from stargzfs import metrics
from stargzfs.registry.hosts import TlsSettings
from stargzfs.registry.tls import context_for, describe_tls_failure, file_stamp

LOG = logging.getLogger(__name__)

# httpx logs every request URL at INFO (signed redirect URLs included) and httpcore traces
# connections at DEBUG: neither may reach a daemon log. Our own log lines carry no query strings.
for _noisy in ("httpx", "httpcore"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

# Bytes per second no healthy registry is below (128 kbit/s): a 64 KiB TOC window gets 4 s on top
# of the timeout, a 4 MiB chunk 256 s.
DEFAULT_MIN_RATE = 16 * 1024
USER_AGENT = "stargzfs"
_QUERY = re.compile(r"(https?://[^\s?#'\"]*)\?[^\s'\"]*")


def redact(text: str) -> str:
    """Drop query strings from any URL in `text` (presigned redirect targets carry signatures)."""
    return _QUERY.sub(r"\1?…", text)


def url_for_log(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"


class HostFailure(Exception):
    """One host did not give a usable answer. `retry`: worth another round after a pause;
    `kind` labels the error metric (connect, tls, timeout, deadline, protocol, 4xx, 5xx, invalid)."""

    def __init__(self, reason: str, status: int | None = None, *, retry: bool = True, kind: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry = retry
        self.kind = kind or (metrics.status_class(status) if status is not None else "invalid")


def transport_failure(exc: httpx.TransportError, netloc: str) -> HostFailure:
    """A short reason without URLs (redirect targets can carry presigned query strings)."""
    tls = describe_tls_failure(exc)
    if tls is not None:
        return HostFailure(f"TLS with {netloc}: {tls}", retry=False, kind="tls")
    if isinstance(exc, httpx.TimeoutException):
        return HostFailure(f"timed out ({exc.__class__.__name__})", kind="timeout")
    if isinstance(exc, httpx.RemoteProtocolError):
        return HostFailure("connection closed before the whole answer arrived (truncated body or reset)",
                           kind="protocol")
    if isinstance(exc, httpx.ConnectError):
        return HostFailure(f"cannot connect to {netloc} ({redact(str(exc))})", kind="connect")
    if isinstance(exc, httpx.ReadError):
        return HostFailure("connection reset while reading", kind="protocol")
    return HostFailure(f"{exc.__class__.__name__}: {redact(str(exc))}", kind="protocol")


class TransferDeadline:
    """The idle and the overall deadline of one request to one host, as one cancel scope."""

    def __init__(self, timeout: float, min_rate: float, expected_bytes: int) -> None:
        self.timeout = timeout
        self.min_rate = min_rate
        now = anyio.current_time()
        self.started = now
        self.idle_at = now + timeout
        self.budget = timeout + max(0, expected_bytes) / min_rate
        self.receiving = False
        self.scope = anyio.CancelScope(deadline=min(self.idle_at, now + self.budget))

    def _update(self) -> None:
        self.scope.deadline = min(self.idle_at, self.started + self.budget)

    def progress(self) -> None:
        self.receiving = True
        self.idle_at = anyio.current_time() + self.timeout
        self._update()

    def expect(self, expected_bytes: int) -> None:
        """The answer turned out to carry `expected_bytes` (a 200 full body for a range)."""
        self.budget = max(self.budget, self.timeout + expected_bytes / self.min_rate)
        self._update()

    def failure(self) -> HostFailure:
        if self.started + self.budget <= self.idle_at:
            return HostFailure(
                f"transfer not complete within its {self.budget:.3g}s deadline "
                f"(timeout {self.timeout:g}s + size at {self.min_rate:g} B/s)", kind="deadline",
            )
        if self.receiving:
            return HostFailure(f"answer stalled: no data within {self.timeout:g}s", kind="timeout")
        return HostFailure(f"no answer within {self.timeout:g}s", kind="timeout")


_CURRENT: contextvars.ContextVar[TransferDeadline | None] = contextvars.ContextVar(
    "stargzfs_registry_deadline", default=None
)


def made_progress() -> None:
    """Headers or a body piece arrived: the current request's idle deadline starts over."""
    deadline = _CURRENT.get()
    if deadline is not None:
        deadline.progress()


def expect_bytes(expected_bytes: int) -> None:
    deadline = _CURRENT.get()
    if deadline is not None:
        deadline.expect(expected_bytes)


@contextmanager
def bounded(timeout: float, min_rate: float, expected_bytes: int) -> Iterator[TransferDeadline]:
    """Run one request to one host under its deadlines; a deadline hit raises HostFailure."""
    deadline = TransferDeadline(timeout, min_rate, expected_bytes)
    token = _CURRENT.set(deadline)
    try:
        with deadline.scope:
            yield deadline
    finally:
        _CURRENT.reset(token)
    if deadline.scope.cancelled_caught:
        raise deadline.failure()


def count_bytes(url: httpx.URL, size: int) -> None:
    metrics.REGISTRY_BYTES.labels(_host_label(url)).inc(size)


def _host_label(url: httpx.URL) -> str:
    return url.netloc.decode("ascii", "replace")


async def _count_answer(response: httpx.Response) -> None:
    metrics.REGISTRY_REQUESTS.labels(_host_label(response.request.url),
                                     metrics.status_class(response.status_code)).inc()


def count_failure(url: httpx.URL, failure: HostFailure) -> None:
    metrics.REGISTRY_ERRORS.labels(_host_label(url), failure.kind).inc()


def _no_cookies() -> CookieJar:
    """A jar that keeps nothing: one client serves every registry and credential set.

    (A jar, not an httpx.Cookies: httpx copies the cookies of a Cookies into a jar of its own.)
    """
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class HttpPool:
    """One httpx.AsyncClient per TLS configuration (the system store, or a host's CA/client/skip)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._clients: dict[tuple[TlsSettings, tuple[tuple[str, int, int], ...]], httpx.AsyncClient] = {}
        self.open = False

    def client_for(self, tls: TlsSettings) -> httpx.AsyncClient:
        if not self.open:
            raise RuntimeError("RegistryClient must be used as `async with RegistryClient(...)`")
        key = (tls, file_stamp(tls))
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                verify=context_for(tls),
                follow_redirects=False,
                timeout=httpx.Timeout(self.timeout),
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                cookies=_no_cookies(),
                event_hooks={"response": [_count_answer]},
            )
            self._clients[key] = client
        return client

    async def aclose(self) -> None:
        self.open = False
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

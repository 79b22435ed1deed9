"""Prometheus metrics of a stargzfs daemon, and the HTTP endpoint that serves them.

Only metric objects and a server live here: the code that does the work calls one line
(`metrics.CONVERSIONS.labels("converted").inc()`, `@metrics.timed("build")`), so this module
knows nothing of FUSE, snapshots or conversions. Metrics are process-global (prometheus_client's
default registry) and cost next to nothing when nobody scrapes them; the endpoint is off unless
`--metrics-address` is given.

Phases measured in the daemon: `toc_fetch` (the footer + TOC range reads and the TOC digest
check), `build` (the builder subprocess, which also parses the TOC, including the wait for a
builder slot) and `merge` (composing image.boot). A separate TOC-parse phase does not exist in
the daemon: parsing happens inside the builder, so it is part of `build`.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from stargzfs.errors import UsageError

P = ParamSpec("P")
T = TypeVar("T")

CONVERSION_RESULTS = ("converted", "not_estargz", "error")
PHASES = ("toc_fetch", "build", "merge")
# Seconds: a TOC fetch is ~10 ms on a LAN; a 1M-entry build takes minutes.
_PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

CONVERSIONS = Counter(
    "stargzfs_conversions", "Layer conversions by result (converted, not_estargz, error)", ["result"]
)
PHASE_SECONDS = Histogram(
    "stargzfs_phase_duration_seconds", "Time spent per conversion phase", ["phase"], buckets=_PHASE_BUCKETS
)
REGISTRY_REQUESTS = Counter(
    "stargzfs_registry_requests", "HTTP answers from registries, mirrors, token and redirect hosts",
    ["host", "status_class"],
)
REGISTRY_BYTES = Counter("stargzfs_registry_bytes", "Blob and manifest body bytes received", ["host"])
REGISTRY_ERRORS = Counter(
    "stargzfs_registry_errors",
    "Failed registry attempts: no answer (connect, tls, timeout, deadline, protocol) or an error status class",
    ["host", "reason"],
)
BOOTSTRAPS_SERVED = Counter("stargzfs_bootstraps_served", "Layer bootstraps (<hex>) made available to a lookup")
IMAGE_BOOTS_SERVED = Counter("stargzfs_image_boots_served", "image.boot files made available to a lookup")
# For lazy blob serving (not built yet): its code increments these.
CHUNKS_FETCHED = Counter("stargzfs_chunks_fetched", "Blob chunks fetched from a registry")
CHUNK_CACHE_HITS = Counter("stargzfs_chunk_cache_hits", "Blob chunk reads answered from the local cache")
CHUNK_BYTES = Counter("stargzfs_chunk_bytes", "Uncompressed blob chunk bytes served")

for _result in CONVERSION_RESULTS:  # exported as 0 before the first conversion
    CONVERSIONS.labels(_result)
for _phase in PHASES:
    PHASE_SECONDS.labels(_phase)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def timed(phase: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorator for a coroutine function: its run time, failures included, goes to `phase`.

    (prometheus_client's own `.time()` decorator would time only the coroutine's creation.)
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    histogram = PHASE_SECONDS.labels(phase)

    def decorate(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            started = time.monotonic()
            try:
                return await function(*args, **kwargs)
            finally:
                histogram.observe(time.monotonic() - started)

        return wrapper

    return decorate


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `:PORT` or `PORT` (the last two bind loopback only)."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 < int(port_text) < 65536 or not port_text.isascii():
        raise UsageError(f"metrics address {text!r}: expected [HOST]:PORT with a port in 1-65535")
    if not host:
        return "127.0.0.1", int(port_text)
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise UsageError(f"metrics address {text!r}: HOST must be an IP address or localhost") from None
    return host, int(port_text)


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: the daemon's log is for the daemon."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """`/metrics` in Prometheus text format. `bind` in the parent (so a taken port fails the
    command), `start` where it should serve (a forked daemon starts its own thread)."""

    def __init__(self, address: str) -> None:
        host, port = parse_address(address)
        server_class = _IPv6Server if ":" in host else ThreadingWSGIServer
        try:
            self._server = make_server(host, port, make_wsgi_app(), server_class, handler_class=_QuietHandler)
        except OSError as exc:
            raise UsageError(f"metrics address {address}: cannot listen: {exc.strerror}") from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread = None
        self._server.server_close()


def serve(address: str) -> MetricsServer:
    """Bind and serve at once (foreground use)."""
    server = MetricsServer(address)
    server.start()
    return server

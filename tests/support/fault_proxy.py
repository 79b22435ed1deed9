"""A small real HTTP proxy that injects faults in front of a real registry (or token server).

    proxy = fault_proxy.start("127.0.0.1:5000", fault="drip:0.5")   # every request drips
    proxy.url                                                       # http://127.0.0.1:PORT
    proxy.faults = ["503", "503"]                                   # the next two requests first
    proxy.seen                                                      # what each request asked (headers too)
    proxy.stop()

Every answer that is not a fault is the upstream's own. Faults (a default for every request via
`fault=`, and a queue `faults` consumed one per request before it):

- `pass`: forward as is.  `full200`: forward without Range (the upstream answers 200 + whole body).
- `503`, `status:<code>`: answer that status with a short body.
- `reset`: TCP RST before any answer.  `hang`: accept, never answer (until stop()).
- `redirect:<base url>`: 307 to the same path on another server.
- `signed-redirect:<base url>`: 307 to base + path + a presigned-URL query carrying `SIGNATURE`.
- `trickle`: the body in TRICKLE_PIECES pieces TRICKLE_GAP seconds apart (slow but steady).
- `drip:<seconds>`: headers at once, then the body one byte per <seconds> (a crawling server).
- `stall`: half the body, then silence with the connection open.
- `truncate`: half the body, then close.
- `set-cookie`: forward, adding a Set-Cookie header whose value is COOKIE.
- `bad-range`: forward, with a Content-Range one byte off what the body holds.
- `endless-401`: 401 with a Basic challenge and a body that never ends (no Content-Length).
- `require-basic`: 401 with a Basic challenge unless the request carries Basic credentials
  (which are not checked: `seen` shows what was sent); then forward.

`fault_proxy_factory` is the fixture form: proxies it starts are stopped at teardown.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

TRICKLE_PIECES = 15
TRICKLE_GAP = 0.1  # seconds: 15 gaps outlast a 1 s deadline in total, none comes near it alone
SIGNATURE = "f0e1d2c3b4a5968778695a4b3c2d1e0fstargzfssignature"
COOKIE = "session-cookie-stargzfs-must-not-replay"
_FORWARDED = ("range", "authorization", "accept")


@dataclass
class Seen:
    path: str  # with its query
    headers: dict[str, str]


@dataclass
class FaultProxy:
    """One proxy in front of `upstream` (host:port, plain HTTP)."""

    upstream: str
    fault: str = "pass"
    faults: list[str] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    release: threading.Event = field(default_factory=threading.Event)
    bind: str = "127.0.0.1"  # the host name clients use

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"{self.bind}:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def next_fault(self) -> str:
        return self.faults.pop(0) if self.faults else self.fault

    def stop(self) -> None:
        self.release.set()
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def start(upstream: str, fault: str = "pass", *, host: str = "127.0.0.1") -> FaultProxy:
    """A started proxy to `upstream`; `host` is the name clients use (e.g. "localhost" for a
    second host name on loopback)."""
    proxy = FaultProxy(upstream, fault=fault, bind=host)
    proxy.server = ThreadingHTTPServer((host, 0), _handler(proxy))
    proxy.server.daemon_threads = True
    threading.Thread(target=proxy.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return proxy


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
            pass

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            proxy.seen.append(Seen(self.path, dict(self.headers.items())))
            fault = proxy.next_fault()
            kind, _, argument = fault.partition(":")
            if kind == "503":
                self._reply(503, {}, b"busy")
            elif kind == "status":
                self._reply(int(argument), {}, b"refused")
            elif kind == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
            elif kind == "hang":
                proxy.release.wait(60)
                self.close_connection = True
            elif kind == "redirect":
                self._reply(307, {"Location": argument + self.path}, b"")
            elif kind == "signed-redirect":
                query = (f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIASTARGZFS%2Fs3&X-Amz-Expires=300"
                         f"&X-Amz-Signature={SIGNATURE}")
                self._reply(307, {"Location": f"{argument}{self.path}?{query}"}, b"")
            elif kind == "endless-401":
                self._endless_401()
            elif kind == "require-basic" and not self.headers.get("Authorization", "").startswith("Basic "):
                self._reply(401, {"WWW-Authenticate": 'Basic realm="fault-proxy"'}, b"credentials, please")
            else:
                self._forward(kind, argument)

        def _endless_401(self) -> None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="fault-proxy"')
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            piece = b"x" * 65536
            try:
                for _ in range(1024):  # 64 MiB at most, should the client read on
                    self.wfile.write(piece)
            except OSError:
                pass

        def _forward(self, fault: str, argument: str) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED}
            if fault == "full200":
                headers.pop("Range", None)
            connection = http.client.HTTPConnection(proxy.upstream, timeout=10)
            try:
                connection.request("GET", self.path, headers=headers)
                answer = connection.getresponse()
                body = answer.read()
                passed = {k: v for k, v in answer.getheaders()
                          if k.lower() not in ("content-length", "transfer-encoding", "connection")}
            finally:
                connection.close()
            if fault == "set-cookie":
                passed["Set-Cookie"] = f"session={COOKIE}; Path=/"
            if fault == "bad-range":
                passed = {k: _shifted_range(v) if k.lower() == "content-range" else v for k, v in passed.items()}
            if fault in ("trickle", "stall", "truncate", "drip"):
                self._send_slowly(fault, argument, answer.status, passed, body)
                return
            self._reply(answer.status, passed, body)

        def _send_slowly(self, fault: str, argument: str, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                if fault == "stall":  # half the body, then silence with the connection left open
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    proxy.release.wait(60)
                elif fault == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif fault == "drip":
                    gap = float(argument or "0.5")
                    for offset in range(len(body)):
                        self.wfile.write(body[offset : offset + 1])
                        self.wfile.flush()
                        if proxy.release.wait(gap):
                            break
                else:  # trickle
                    step = -(-len(body) // TRICKLE_PIECES)
                    for offset in range(0, len(body), step):
                        self.wfile.write(body[offset : offset + step])
                        self.wfile.flush()
                        time.sleep(TRICKLE_GAP)
            except OSError:
                pass  # the client gave up: that is what the fault is for
            self.close_connection = fault != "trickle"

        def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _shifted_range(value: str) -> str:
    """`bytes a-b/n` -> `bytes a+1-b+1/n`: a lie a careless or hostile server could tell."""
    unit, _, rest = value.partition(" ")
    span, _, total = rest.partition("/")
    first, _, last = span.partition("-")
    if not (first.isdigit() and last.isdigit()):
        return value
    return f"{unit} {int(first) + 1}-{int(last) + 1}/{total}"


@pytest.fixture
def fault_proxy_factory() -> Iterator[Callable[..., FaultProxy]]:
    """`fault_proxy_factory(upstream, fault="pass", host="127.0.0.1")` → started FaultProxy, stopped after."""
    started: list[FaultProxy] = []

    def make(upstream: str, fault: str = "pass", *, host: str = "127.0.0.1") -> FaultProxy:
        proxy = start(upstream, fault, host=host)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()

"""A small REAL Bearer token endpoint (docker token spec) that docker-registry's `auth.token` accepts.

Tokens are RS256 JWTs whose header carries the signing certificate (`x5c`); docker-registry checks
that certificate against `rootcertbundle`, so the registry really verifies what we issue. The key
and self-signed certificate come from the `openssl` CLI (always present on Debian: ca-certificates
depends on it), so no Python crypto package is needed.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

SERVICE = "stargzfs-test-registry"
ISSUER = "stargzfs-test-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class TokenRequest:
    """What one GET /token asked for (never the password)."""

    scope: str
    service: str
    account: str
    user: str | None  # authenticated user, None for anonymous
    status: int


class TokenServer:
    """GET /token?service=&scope=repository:<repo>:<actions> → {"token"|"access_token": JWT}.

    `users` maps user → password for Basic auth on the token request; `allow_anonymous` grants
    tokens without credentials. `stale_tokens=N` makes the first N tokens already expired for
    the registry (while the JSON claims a long life), to exercise the client's one refresh.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        allow_anonymous: bool = False,
        token_field: str = "token",
        expires_in: int = 300,
        stale_tokens: int = 0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.allow_anonymous = allow_anonymous
        self.token_field = token_field
        self.expires_in = expires_in
        self.stale_tokens = stale_tokens
        self.key_path = self.workdir / "token-key.pem"
        self.cert_path = self.workdir / "token-cert.pem"
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []  # every token handed out, so tests can look for leaks
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._cert_der_b64 = ""

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "TokenServer":
        if self._server is not None:
            return self
        self._make_key_and_cert()
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token server not started")
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_auth_config(self) -> dict[str, str]:
        """The `token_auth=` dict for RegistryProcess / registry_factory."""
        return {
            "realm": self.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(self.cert_path),
        }

    def _make_key_and_cert(self) -> None:
        if not self.cert_path.exists():
            subprocess.run(
                [
                    "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                    "-keyout", str(self.key_path), "-out", str(self.cert_path),
                    "-days", "2", "-subj", "/CN=stargzfs-test-token-issuer",
                ],
                check=True,
                capture_output=True,
            )
        pem = self.cert_path.read_text()
        body = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
        self._cert_der_b64 = "".join(body.split())

    # --- tokens ---------------------------------------------------------------------------------

    def issue(self, account: str, scopes: list[str], *, stale: bool = False) -> str:
        """A JWT granting the requested repository actions (pull/push only)."""
        now = int(time.time())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                granted = [action for action in actions.split(",") if action in ("pull", "push")]
                access.append({"type": kind, "name": name, "actions": granted})
        # docker-registry allows 60 s of clock leeway, so a stale token must be older than that.
        expires = now - 600 if stale else now + self.expires_in
        claims = {
            "iss": ISSUER,
            "sub": account,
            "aud": SERVICE,
            "exp": expires,
            "nbf": expires - 3600 if stale else now - 10,
            "iat": expires - 3600 if stale else now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._cert_der_b64]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input.encode("ascii"),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _authenticate(self, header: str | None) -> tuple[bool, str | None]:
        """(allowed, user) for an Authorization header."""
        if not header:
            return self.allow_anonymous, None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False, None
        if user in self.users and secrets.compare_digest(self.users[user], password):
            return True, user
        return False, None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
                pass  # keep test output clean

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                parts = urlsplit(self.path)
                if parts.path != "/token":
                    self._answer(404, {"error": "not found"})
                    return
                query = parse_qs(parts.query)
                scopes = query.get("scope", [])
                service = (query.get("service") or [""])[0]
                account = (query.get("account") or [""])[0]
                allowed, user = server._authenticate(self.headers.get("Authorization"))
                status = 200 if allowed and service == SERVICE else 401
                with server._lock:
                    server.requests.append(TokenRequest(" ".join(scopes), service, account, user, status))
                    stale = status == 200 and server.stale_tokens > 0
                    if stale:
                        server.stale_tokens -= 1
                if status != 200:
                    self._answer(status, {"errors": [{"code": "UNAUTHORIZED"}]})
                    return
                token = server.issue(user or "", scopes, stale=stale)
                with server._lock:
                    server.issued.append(token)
                self._answer(200, {server.token_field: token, "expires_in": server.expires_in,
                                   "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

            def _answer(self, status: int, document: dict) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


@pytest.fixture
def token_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., TokenServer]]:
    """`token_server_factory(users=..., allow_anonymous=..., ...)` → started TokenServer, stopped after."""
    started: list[TokenServer] = []

    def make(**options: object) -> TokenServer:
        server = TokenServer(tmp_path_factory.mktemp("token-server"), **options)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.stop()

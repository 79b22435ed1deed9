"""The httpx.Auth flow that answers a registry's own 401 challenge (Basic, Bearer, token mode).

It answers on the request that got the challenge (no `/v2/` ping, no probe), so a blob read
costs no extra round trip once a token is cached. Which credentials to use is decided before
(stargzfs.registry.credentials). Secrets live only in request headers: never in reprs,
messages or logs.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from dataclasses import dataclass

import anyio
import httpx

from stargzfs.errors import RegistryError
from stargzfs.registry.credentials import Credentials
from stargzfs.registry.reference import Reference, default_scheme

LOG = logging.getLogger(__name__)

# A token whose remaining life is shorter than this is refreshed before use.
_TOKEN_EXPIRY_MARGIN = 5.0
# Docker's token spec: a token without expires_in lives 60 s.
_DEFAULT_TOKEN_LIFETIME = 60.0
# Token answers are small JSON documents; anything larger is not a token endpoint.
_MAX_TOKEN_RESPONSE = 1 << 20
# A 401 body is an error document we never use: read at most this much (httpx reads it whole otherwise).
MAX_CHALLENGE_BODY = 64 << 10

_CHALLENGE_PARAM = re.compile(r'([a-zA-Z_][a-zA-Z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" or "bearer"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse one `WWW-Authenticate` value (`Bearer realm="...",service="..."`)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {
        match.group(1).lower(): (match.group(2) if match.group(2) is not None else match.group(3)).replace('\\"', '"')
        for match in _CHALLENGE_PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


@dataclass
class _BearerToken:
    value: str
    expires_at: float

    def usable(self) -> bool:
        return time.monotonic() + _TOKEN_EXPIRY_MARGIN < self.expires_at


class AuthState:
    """What one client learned about one (registry, repository, credentials): shared by its blobs.

    Kept per repository because bearer tokens are scoped to `repository:<repo>:pull`.
    """

    def __init__(self) -> None:
        self.scheme: str | None = None  # "basic" / "bearer" once the registry has challenged
        self.token: _BearerToken | None = None
        self.token_requests = 0
        self.lock = anyio.Lock()


class RegistryAuth(httpx.Auth):
    """Anonymous, Basic, Bearer-challenge and token-mode auth for ONE registry host.

    Authorization is attached only to requests whose host:port is the registry's, so a redirect
    to S3/a CDN (or anything else) never sees it. On a 401 from the registry: Basic → retry with
    the credentials; Bearer → fetch a token from the realm (Basic to the realm when credentials
    exist) with scope `repository:<repo>:pull`, retry; a 401 with a token we already had triggers
    exactly one refresh. Token mode (empty username) uses the secret as the bearer token directly.
    """

    def __init__(
        self,
        ref: Reference,
        credentials: Credentials | None,
        *,
        state: AuthState | None = None,
        auth_timeout: float = 10.0,
        scheme: str | None = None,
        insecure_hosts: tuple[str, ...] = (),
        host: str | None = None,
    ) -> None:
        self.ref = ref
        self.insecure_hosts = tuple(insecure_hosts)
        host = host or ref.api_host  # a mirror's own host when the requests go there
        scheme = scheme or default_scheme(host, self.insecure_hosts)
        self.registry_netloc = _netloc(httpx.URL(f"{scheme}://{host}/"))
        self.credentials = credentials
        self.state = state if state is not None else AuthState()
        self.auth_timeout = auth_timeout

    def __repr__(self) -> str:
        return f"RegistryAuth({self.ref.name!r}, credentials={self.credentials!r})"

    # The flow is async (lock + token request); the sync variant is unsupported on purpose.
    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("RegistryAuth is async-only; use httpx.AsyncClient")

    def _is_registry_host(self, url: httpx.URL) -> bool:
        return _netloc(url) == self.registry_netloc

    def _apply(self, request: httpx.Request) -> str | None:
        """Attach what we know works; returns the bearer token value used (for refresh logic)."""
        request.headers.pop("Authorization", None)
        if not self._is_registry_host(request.url):
            return None
        credentials = self.credentials
        if credentials is not None and credentials.is_token:
            request.headers["Authorization"] = f"Bearer {credentials.secret}"
            return credentials.secret
        if self.state.scheme == "basic" and credentials is not None:
            request.headers["Authorization"] = credentials.basic_header()
        elif self.state.scheme == "bearer" and self.state.token is not None and self.state.token.usable():
            request.headers["Authorization"] = f"Bearer {self.state.token.value}"
            return self.state.token.value
        return None

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        used_token = self._apply(request)
        response = yield request
        if response.status_code != 401 or not self._is_registry_host(request.url):
            return
        if self.credentials is not None and self.credentials.is_token:
            return  # nothing else to try: the caller reports the 401
        await read_capped(response, MAX_CHALLENGE_BODY, f"{self.ref.name}: 401 answer")
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            return
        if challenge.scheme == "basic":
            if self.credentials is None or self.state.scheme == "basic":
                return  # anonymous, or these credentials were already refused
            self.state.scheme = "basic"
            self._apply(request)
            yield request
            return
        if challenge.scheme != "bearer":
            return
        # A refused token gets exactly one refresh; a request sent without one may fetch one first.
        rounds = 1 if used_token is not None else 2
        for _ in range(rounds):
            async with self.state.lock:
                current = self.state.token
                if current is None or not current.usable() or current.value == used_token:
                    realm = challenge.params.get("realm")
                    if not realm:
                        raise RegistryError(f"{self.ref.name}: Bearer challenge without a realm")
                    token_response = yield self._token_request(realm, challenge.params.get("service"))
                    self.state.token = await self._read_token(token_response)
                    self.state.token_requests += 1
                # else: another request refreshed it meanwhile; use that one.
                self.state.scheme = "bearer"
            used_token = self._apply(request)
            response = yield request
            if response.status_code != 401:
                return
            await read_capped(response, MAX_CHALLENGE_BODY, f"{self.ref.name}: 401 answer")
            retry_challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
            if retry_challenge is None or retry_challenge.scheme != "bearer":
                return
            challenge = retry_challenge

    def _token_request(self, realm: str, service: str | None) -> httpx.Request:
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            raise RegistryError(f"{self.ref.name}: Bearer challenge has an invalid realm") from None
        if url.scheme not in ("http", "https"):
            raise RegistryError(f"{self.ref.name}: Bearer realm must be http(s), got {url.scheme!r}")
        if url.scheme == "http" and default_scheme(_netloc(url), self.insecure_hosts) != "http":
            # Basic credentials (and the token coming back) would cross the network in clear text.
            raise RegistryError(
                f"{self.ref.name}: refusing plain-http Bearer realm host {_netloc(url)}: the token endpoint "
                "must be https unless it is loopback/private or listed as an insecure registry"
            )
        params: dict[str, str] = {"scope": f"repository:{self.ref.repository}:pull"}
        if service:
            params["service"] = service
        headers: dict[str, str] = {}
        if self.credentials is not None and not self.credentials.is_token:
            params["account"] = self.credentials.username
            headers["Authorization"] = self.credentials.basic_header()
        timeout = httpx.Timeout(self.auth_timeout)
        return httpx.Request(
            "GET", url.copy_merge_params(params), headers=headers, extensions={"timeout": timeout.as_dict()}
        )

    async def _read_token(self, response: httpx.Response) -> _BearerToken:
        realm_host = response.request.url.host
        if response.status_code != 200:
            await response.aclose()
            hint = " (credentials refused)" if response.status_code in (401, 403) else ""
            raise RegistryError(
                f"{self.ref.name}: token request to {realm_host} failed: HTTP {response.status_code}{hint}"
            )
        # The whole answer within auth_timeout: httpx's own timeout only bounds each silence.
        with anyio.move_on_after(self.auth_timeout) as scope:
            body = await read_capped(response, _MAX_TOKEN_RESPONSE, f"{self.ref.name}: token answer from {realm_host}")
        if scope.cancelled_caught:
            await response.aclose()
            raise RegistryError(
                f"{self.ref.name}: token answer from {realm_host} not complete within {self.auth_timeout:g}s"
            )
        try:
            document = json.loads(body)
        except ValueError:
            raise RegistryError(f"{self.ref.name}: token answer from {realm_host} is not JSON") from None
        value = document.get("token") or document.get("access_token") if isinstance(document, dict) else None
        if not isinstance(value, str) or not value:
            raise RegistryError(
                f"{self.ref.name}: token answer from {realm_host} has neither 'token' nor 'access_token'"
            )
        lifetime = document.get("expires_in")
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        return _BearerToken(value, time.monotonic() + float(lifetime))


class _CappedStream(httpx.AsyncByteStream):
    """A response body that fails once it passes `limit` bytes."""

    def __init__(self, inner: httpx.AsyncByteStream, limit: int, what: str) -> None:
        self._inner = inner
        self._limit = limit
        self._what = what

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for piece in self._inner:
            received += len(piece)
            if received > self._limit:
                raise RegistryError(f"{self._what} is larger than {self._limit} bytes")
            yield piece

    async def aclose(self) -> None:
        await self._inner.aclose()


async def read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """`response.aread()` that stops past `limit` bytes (RegistryError naming `what`).

    aread() (not a loop of our own) because httpx reads an auth-flow response again after the
    flow resumes and must find it read; wrapping its stream keeps that read bounded too.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        await response.aclose()
        raise RegistryError(f"{what} is larger than {limit} bytes")
    if not response.is_stream_consumed:
        response.stream = _CappedStream(response.stream, limit, what)  # type: ignore[arg-type]
    return await response.aread()


def _netloc(url: httpx.URL) -> str:
    """host[:port] as written in references, with the scheme's default port left out."""
    host = url.host.lower()
    if ":" in host:
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}.get(url.scheme)
    if url.port is not None and url.port != default_port:
        return f"{host}:{url.port}"
    return host

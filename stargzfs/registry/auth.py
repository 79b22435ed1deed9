"""Registry credentials (where they come from) and the httpx.Auth flow that uses them.

Credential sources follow nydus-snapshotter's keychain order: snapshot labels, then docker's
config.json, then anonymous. The flow answers the registry's own 401 challenge on the request
that got it (no `/v2/` ping, no probe), so a blob read costs no extra round trip once a token is
cached. Secrets live only in `Credentials.secret` and in request headers: never in reprs,
messages or logs.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

from stargzfs.errors import RegistryError, UsageError
from stargzfs.registry.reference import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    DOCKER_HUB_LEGACY,
    Reference,
    default_scheme,
)

LOG = logging.getLogger(__name__)

LABEL_PULL_USERNAME = "containerd.io/snapshot/pullusername"
LABEL_PULL_SECRET = "containerd.io/snapshot/pullsecret"
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"

# A token whose remaining life is shorter than this is refreshed before use.
_TOKEN_EXPIRY_MARGIN = 5.0
# Docker's token spec: a token without expires_in lives 60 s.
_DEFAULT_TOKEN_LIFETIME = 60.0
_HELPER_TIMEOUT = 10.0
# Token answers are small JSON documents; anything larger is not a token endpoint.
_MAX_TOKEN_RESPONSE = 1 << 20


@dataclass(frozen=True)
class Credentials:
    """A username + secret; an empty username means the secret is a registry bearer token."""

    username: str
    secret: str = field(repr=False)

    @property
    def is_token(self) -> bool:
        return self.username == "" and self.secret != ""

    def __repr__(self) -> str:
        who = "<token>" if self.is_token else repr(self.username)
        return f"Credentials(username={who}, secret=<hidden>)"

    __str__ = __repr__

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def credentials_from_labels(labels: Mapping[str, str] | None) -> Credentials | None:
    """Both labels must be non-empty, as upstream's FromLabels requires."""
    if not labels:
        return None
    username = labels.get(LABEL_PULL_USERNAME, "")
    secret = labels.get(LABEL_PULL_SECRET, "")
    if username and secret:
        return Credentials(username, secret)
    return None


def docker_config_path(docker_config: Path | None = None) -> Path:
    """An explicit file or directory, else `$DOCKER_CONFIG/config.json`, else ~/.docker/config.json."""
    if docker_config is not None:
        path = Path(docker_config)
        return path / "config.json" if path.is_dir() else path
    env_dir = os.environ.get("DOCKER_CONFIG")
    if env_dir:
        return Path(env_dir) / "config.json"
    return Path.home() / ".docker" / "config.json"


def _config_key_host(key: str) -> str:
    """Docker's file store matches `auths` keys by host: drop scheme and path."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key.strip())
    return host.split("/", 1)[0].lower()


def _candidate_hosts(ref: Reference) -> list[str]:
    if ref.registry == DOCKER_HUB:
        return [DOCKER_HUB_LEGACY, DOCKER_HUB, DOCKER_HUB_API]
    return [ref.registry.lower()]


def _entry_credentials(entry: object, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise UsageError(f"{path}: auths entry {key!r} is not an object")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise UsageError(f"{path}: auths entry {key!r} has an invalid base64 'auth'") from None
        username, colon, secret = decoded.partition(":")
        if not colon:
            raise UsageError(f"{path}: auths entry {key!r} 'auth' is not base64(user:password)")
    else:
        username = entry.get("username") or ""
        secret = entry.get("password") or ""
        if not isinstance(username, str) or not isinstance(secret, str):
            raise UsageError(f"{path}: auths entry {key!r} has a non-string username/password")
    # Upstream ignores identity-token-only entries: user AND password are required.
    if username and secret:
        return Credentials(username, secret)
    return None


def credentials_from_docker_config(ref: Reference, docker_config: Path | None = None) -> Credentials | None:
    """Look `ref`'s registry up in docker's config.json `auths` (Hub under its legacy key too)."""
    path = docker_config_path(docker_config)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read docker config: {exc.strerror}") from None
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: docker config is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(document, dict):
        raise UsageError(f"{path}: docker config is not a JSON object")
    auths = document.get("auths")
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise UsageError(f"{path}: 'auths' is not an object")
    helper = _credential_helper_name(document, ref, path)
    if helper:
        found = _credentials_from_helper(helper, ref)
        if found is not None:
            return found
    # Exact keys first (the registry as written, Hub's legacy URL), then docker's by-host match.
    keys = [key for key in (ref.registry, DOCKER_HUB_CONFIG_KEY if ref.registry == DOCKER_HUB else None)
            if key is not None and key in auths]
    by_host: dict[str, str] = {}
    for key in auths:
        by_host.setdefault(_config_key_host(key), key)
    keys += [by_host[host] for host in _candidate_hosts(ref) if host in by_host and by_host[host] not in keys]
    for key in keys:
        found = _entry_credentials(auths[key], path, key)
        if found is not None:
            return found
    return None


def _credential_helper_name(document: dict, ref: Reference, path: Path) -> str | None:
    """docker's rule: a per-registry `credHelpers` entry, else the global `credsStore`."""
    helpers = document.get("credHelpers") or {}
    if not isinstance(helpers, dict):
        raise UsageError(f"{path}: 'credHelpers' is not an object")
    for host in [ref.registry.lower(), *_candidate_hosts(ref)]:
        if isinstance(helpers.get(host), str) and helpers[host]:
            return helpers[host]
    store = document.get("credsStore")
    return store if isinstance(store, str) and store else None


def _credentials_from_helper(helper: str, ref: Reference) -> Credentials | None:
    """Run `docker-credential-<helper> get`; the server URL goes on stdin, the answer on stdout.

    Nothing secret is ever in argv; the helper's output is never echoed into errors.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", helper):
        raise UsageError(f"docker config names an invalid credential helper {helper!r}")
    program = f"docker-credential-{helper}"
    server = DOCKER_HUB_CONFIG_KEY if ref.registry == DOCKER_HUB else ref.registry
    try:
        result = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True, timeout=_HELPER_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise UsageError(f"docker config uses credential helper {program!r}, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"credential helper {program!r} did not answer within {_HELPER_TIMEOUT:g}s") from None
    if result.returncode != 0:
        if b"credentials not found" in result.stdout.lower() + result.stderr.lower():
            return None
        raise UsageError(f"credential helper {program!r} failed for {server} (exit {result.returncode})")
    try:
        answer = json.loads(result.stdout)
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"credential helper {program!r} gave an answer that is not its JSON format") from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise UsageError(f"credential helper {program!r} gave a non-string Username/Secret")
    # "<token>" marks an identity token, which upstream ignores like identity-token-only entries.
    if username and secret and username != "<token>":
        return Credentials(username, secret)
    return None


def resolve_credentials(
    ref: Reference,
    labels: Mapping[str, str] | None = None,
    docker_config: Path | None = None,
) -> Credentials | None:
    """labels → docker config.json → None (anonymous), first hit wins (spec §3)."""
    return credentials_from_labels(labels) or credentials_from_docker_config(ref, docker_config)


class CredentialCache:
    """`resolve_credentials` for async callers: off the event loop, remembered for a short while.

    Reading config.json and running a `docker-credential-*` helper block (a helper for up to
    its timeout): a daemon's loop must keep serving meanwhile, and the layers of one image
    converted in a burst should not run the helper once each. Label credentials need no I/O
    and are never cached; failures are not cached either.
    """

    def __init__(self, docker_config: Path | None = None, ttl: float = 30.0) -> None:
        self._docker_config = docker_config
        self._ttl = ttl
        self._entries: dict[tuple[str, str], tuple[float, Credentials | None]] = {}
        self._locks: dict[tuple[str, str], anyio.Lock] = {}
        self.lookups = 0  # docker-config lookups actually run (for tests and diagnostics)

    def __repr__(self) -> str:
        return f"CredentialCache(entries={len(self._entries)})"

    async def resolve(self, ref: Reference, labels: Mapping[str, str] | None = None) -> Credentials | None:
        from_labels = credentials_from_labels(labels)
        if from_labels is not None:
            return from_labels
        key = (ref.registry, ref.repository)
        lock = self._locks.setdefault(key, anyio.Lock())
        async with lock:  # one helper run per key at a time; waiters take its answer
            cached = self._entries.get(key)
            if cached is not None and time.monotonic() < cached[0]:
                return cached[1]
            self.lookups += 1
            found = await anyio.to_thread.run_sync(credentials_from_docker_config, ref, self._docker_config)
            self._entries[key] = (time.monotonic() + self._ttl, found)
            return found


# --- the challenge/response flow -------------------------------------------------------------

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
    ) -> None:
        self.ref = ref
        self.insecure_hosts = tuple(insecure_hosts)
        scheme = scheme or default_scheme(ref.api_host, self.insecure_hosts)
        self.registry_netloc = _netloc(httpx.URL(f"{scheme}://{ref.api_host}/"))
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
        await response.aread()
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
            await response.aread()
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
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > _MAX_TOKEN_RESPONSE:
            await response.aclose()
            raise RegistryError(f"{self.ref.name}: token answer from {realm_host} is too large")
        # aread() (not a stream loop): httpx reads this response again after the flow resumes.
        body = await response.aread()
        if len(body) > _MAX_TOKEN_RESPONSE:
            raise RegistryError(f"{self.ref.name}: token answer from {realm_host} is too large")
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


def _netloc(url: httpx.URL) -> str:
    """host[:port] as written in references, with the scheme's default port left out."""
    host = url.host.lower()
    if ":" in host:
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}.get(url.scheme)
    if url.port is not None and url.port != default_port:
        return f"{host}:{url.port}"
    return host

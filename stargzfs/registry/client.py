"""Registry client: checked ranged blob reads and manifests, over the hosts containerd would try.

Why not upstream's way: nydus-snapshotter probes (`bytes=0-0` twice) before every read and trusts
any 2xx, so a 200 full body is silently taken for the requested range. Here each read is ONE
request whose answer is validated (206 + matching Content-Range, or a 200 body sliced correctly),
auth is answered on the 401 of that same request, and a redirect learned once is reused.

Hosts: a registry's hosts.toml mirrors are tried in order, then the server; a host that cannot be
reached, answers 5xx or 404 (a mirror also on 401/403) passes the read to the next one, and a
blob keeps reading from the host that answered. Credentials are looked up for the host contacted:
the caller's own (snapshot labels) only ever go to the registry itself.

What `BlobReader.requests` counts: blob-data answers that were used (2xx), one per successful
read. Not counted: 401 challenges, token requests, a 3xx hop, failed attempts that were retried.
`bytes_read` counts body bytes received in those answers (a 200 full body counts in full).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import httpx

from stargzfs.digest import validate_digest
from stargzfs.errors import RegistryError
from stargzfs.registry.auth import AuthState, RegistryAuth
from stargzfs.registry.credentials import CredentialCache, Credentials
from stargzfs.registry.hosts import Endpoint, HostsDirectory, TlsSettings
from stargzfs.registry.reference import Reference, as_reference
from stargzfs.registry.transport import (
    DEFAULT_MIN_RATE,
    HostFailure,
    HttpPool,
    bounded,
    count_bytes,
    count_failure,
    expect_bytes,
    made_progress,
    transport_failure,
    url_for_log,
)

LOG = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit for manifests and indexes
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass
class RegistryConfig:
    """Client knobs. `retries` counts extra rounds after the first (so 3 → at most 4 per host)."""

    insecure_hosts: tuple[str, ...] = ()
    timeout: float = 15.0  # per request: until the answer's headers, then each gap between body pieces
    auth_timeout: float = 10.0  # each token request, headers and body
    retries: int = 3  # idempotent GETs on connection errors / timeouts / 5xx
    backoff: float = 0.2  # base seconds, doubled per retry
    docker_config: Path | None = None
    hosts_dir: Path | None = None  # containerd's certs.d; None: the registry alone, system trust store
    min_rate: float = DEFAULT_MIN_RATE  # bytes/s: a request must end within timeout + bytes / min_rate


class RegistryRequestError(RegistryError):
    """A RegistryError that also says which ref/digest and HTTP status (None: no answer)."""

    def __init__(self, message: str, *, ref: Reference, digest: str | None, status: int | None = None) -> None:
        super().__init__(message)
        self.ref = ref
        self.digest = digest
        self.status = status


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """`bytes 0-9/100` → (0, 9, 100); `bytes */100` → (None, None, 100); unknown total → None."""
    match = _CONTENT_RANGE.match((value or "").strip())
    if match is None:
        raise ValueError(f"malformed Content-Range {value!r}")
    first = int(match.group(1)) if match.group(1) is not None else None
    last = int(match.group(2)) if match.group(2) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    if first is not None and last is not None and (last < first or (total is not None and last >= total)):
        raise ValueError(f"inconsistent Content-Range {value!r}")
    return first, last, total


@dataclass
class Route:
    """One host to read from: its endpoint, the HTTP client for its TLS, its auth flow, the URL."""

    endpoint: Endpoint
    http: httpx.AsyncClient
    auth: RegistryAuth
    url: httpx.URL


class Routes:
    """The hosts one blob or manifest can come from, each made ready (credentials, TLS) on first use."""

    def __init__(
        self, client: "RegistryClient", ref: Reference, endpoints: Sequence[Endpoint], suffix: str,
        given: Credentials | None, resolved: bool,
    ) -> None:
        self._client = client
        self._ref = ref
        self.endpoints = list(endpoints)
        self._suffix = suffix
        self._given = given
        self._resolved = resolved
        self._ready: dict[int, Route] = {}

    def __len__(self) -> int:
        return len(self.endpoints)

    async def get(self, index: int) -> Route:
        route = self._ready.get(index)
        if route is None:
            route = await self._client.route(self._ref, self.endpoints[index], self._suffix, self._given,
                                             self._resolved)
            self._ready[index] = route
        return route


class RegistryClient:
    """Pooled HTTP clients plus per-host, per-repository auth state; use as `async with`."""

    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.config = config if config is not None else RegistryConfig()
        self.hosts = HostsDirectory(self.config.hosts_dir, self.config.insecure_hosts)
        self._pool = HttpPool(self.config.timeout)
        self._auth_states: dict[tuple[str, str, str, Credentials | None], AuthState] = {}
        self._credentials = CredentialCache(self.config.docker_config)

    async def __aenter__(self) -> "RegistryClient":
        self._pool.open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._pool.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        """The client for hosts without TLS settings of their own (the system trust store)."""
        return self._pool.client_for(TlsSettings())

    def token_requests(self, ref: Reference | str) -> int:
        """Token requests made so far for ref's repository on its registry host (all credential sets)."""
        reference = as_reference(ref)
        return sum(
            state.token_requests
            for (_, netloc, repository, _), state in self._auth_states.items()
            if netloc == reference.api_host and repository == reference.repository
        )

    def endpoints(self, ref: Reference, capability: str) -> list[Endpoint]:
        """The hosts that may serve `capability` (pull, resolve) for ref's registry, in order."""
        found = [endpoint for endpoint in self.hosts.endpoints(ref.registry) if endpoint.can(capability)]
        if not found:
            raise RegistryRequestError(
                f"{ref}: no host in the hosts.toml of {ref.registry} has the {capability!r} capability",
                ref=ref, digest=None,
            )
        return found

    async def route(
        self, ref: Reference, endpoint: Endpoint, suffix: str, given: Credentials | None, resolved: bool
    ) -> Route:
        """Credentials for the host contacted, its TLS client and auth flow, the URL (`?ns=` on a mirror)."""
        if endpoint.netloc != ref.api_host:
            # The caller's credentials (snapshot labels) belong to the image's registry: another
            # host gets what docker's config holds for that host, or nothing.
            host_ref = Reference(endpoint.netloc, ref.repository, ref.tag, ref.digest)
            credentials = await self._credentials.resolve(host_ref)
        elif resolved:
            credentials = given
        else:
            credentials = await self._credentials.resolve(ref, given)
        key = (endpoint.scheme, endpoint.netloc, ref.repository, credentials)
        state = self._auth_states.setdefault(key, AuthState())
        auth = RegistryAuth(
            ref, credentials, state=state, auth_timeout=self.config.auth_timeout, scheme=endpoint.scheme,
            insecure_hosts=self.config.insecure_hosts, host=endpoint.netloc,
        )
        url = httpx.URL(f"{endpoint.root}/{ref.repository}/{suffix}")
        if endpoint.mirror:
            url = url.copy_add_param("ns", ref.registry)
        return Route(endpoint, self._pool.client_for(endpoint.tls), auth, url)

    def blob(
        self, ref: Reference | str, digest: str, *, credentials: Credentials | None = None, resolved: bool = False
    ) -> "BlobReader":
        """`resolved=True`: `credentials` is already the keychain's answer for the registry (None =
        anonymous), so no config file or helper is consulted for it (daemons resolve in a thread)."""
        reference = as_reference(ref)
        validate_digest(digest, f" for a blob of {reference}")
        routes = Routes(self, reference, self.endpoints(reference, "pull"), f"blobs/{digest}", credentials, resolved)
        return BlobReader(self, reference, digest, routes)

    # --- shared request machinery ---------------------------------------------------------------

    async def first_answer(
        self,
        what: str,
        ref: Reference,
        digest: str | None,
        routes: Routes,
        attempt: Callable[[int, Route], Awaitable[T]],
        *,
        expected_bytes: int,
        start: int = 0,
    ) -> tuple[T, int]:
        """`attempt` on each host from `start` on until one answers; rounds repeat with backoff while
        the last host's failure is worth retrying. Returns the result and the host's index."""
        config = self.config
        attempts = max(0, config.retries) + 1
        failures: list[tuple[Route, HostFailure]] = []
        for number in range(attempts):
            if number:
                await anyio.sleep(config.backoff * (2 ** (number - 1)))
            failures = []
            for index in range(start, len(routes)):
                route = await routes.get(index)
                try:
                    with bounded(config.timeout, config.min_rate, expected_bytes):
                        return await attempt(index, route), index
                except HostFailure as failure:
                    count_failure(route.url, failure)
                    failures.append((route, failure))
                    if index + 1 < len(routes):
                        LOG.info("%s: %s: %s; trying %s", what, route.endpoint.describe(), failure.reason,
                                 routes.endpoints[index + 1].describe())
                except RegistryRequestError as error:
                    if error.status is not None:
                        count_failure(route.url, HostFailure("", error.status))
                    raise
            last = failures[-1][1]
            if not last.retry:
                break
            LOG.debug("%s: %s (attempt %d of %d)", what, last.reason, number + 1, attempts)
        last = failures[-1][1]
        if len(failures) == 1:
            reason = last.reason
        else:
            reason = "; ".join(f"{route.endpoint.describe()}: {failure.reason}" for route, failure in failures)
        gave_up = f" (gave up after {number + 1} attempts)" if last.retry else ""
        raise RegistryRequestError(f"{what}: {reason}{gave_up}", ref=ref, digest=digest, status=last.status)

    async def send(self, route: Route, url: httpx.URL, headers: Mapping[str, str]) -> httpx.Response:
        """One streamed GET; transport failures become HostFailure. Caller closes the response."""
        extra = route.endpoint.headers if url.netloc == route.url.netloc else ()
        request = route.http.build_request("GET", url, headers=[*extra, *headers.items()])
        try:
            response = await route.http.send(request, auth=route.auth, stream=True, follow_redirects=False)
        except httpx.TransportError as exc:
            raise transport_failure(exc, url.netloc.decode("ascii", "replace")) from None
        made_progress()
        LOG.debug("GET %s %s -> %d", url_for_log(url), headers.get("Range", ""), response.status_code)
        return response

    # --- manifests ------------------------------------------------------------------------------

    async def get_manifest(
        self,
        ref: Reference | str,
        *,
        credentials: Credentials | None = None,
        platform_spec: str | None = None,
    ) -> dict:
        """The image manifest JSON; an index/list is resolved to `platform_spec` (default: this host)."""
        reference = as_reference(ref)
        document = await self._fetch_manifest(reference, reference.digest or reference.tag or "latest", credentials)
        media_type = document.get("mediaType")
        if media_type in INDEX_MEDIA_TYPES or (media_type is None and "manifests" in document):
            digest = _pick_platform(reference, document, platform_spec or _host_platform())
            document = await self._fetch_manifest(reference, digest, credentials)
        if not isinstance(document.get("layers"), list):
            raise RegistryRequestError(f"{reference}: manifest has no 'layers' list", ref=reference, digest=None)
        return document

    async def _fetch_manifest(self, ref: Reference, selector: str, credentials: Credentials | None) -> dict:
        by_digest = selector.startswith("sha256:")
        # A tag is resolved only by a host trusted to (capability "resolve"); a digest checks itself.
        endpoints = self.endpoints(ref, "pull" if by_digest else "resolve")
        routes = Routes(self, ref, endpoints, f"manifests/{selector}", credentials, False)
        accept = ", ".join(MANIFEST_MEDIA_TYPES + INDEX_MEDIA_TYPES)
        what = f"{ref}: GET manifest {selector}"

        async def attempt(_index: int, route: Route) -> bytes:
            response = await self.send(route, route.url, {"Accept": accept})
            try:
                status = response.status_code
                if status >= 500 or status == 404:
                    raise HostFailure(f"HTTP {status}{_status_hint(status)}", status, retry=status != 404)
                if status != 200:
                    raise RegistryRequestError(
                        f"{what}: HTTP {status}{_status_hint(status)}", ref=ref, digest=None, status=status
                    )
                declared = response.headers.get("Content-Length", "")
                expect_bytes(int(declared) if declared.isdigit() else _MAX_MANIFEST_BYTES)
                body = bytearray()
                try:
                    async for piece in response.aiter_raw():
                        made_progress()
                        count_bytes(route.url, len(piece))
                        body += piece
                        if len(body) > _MAX_MANIFEST_BYTES:
                            raise RegistryRequestError(
                                f"{what}: manifest larger than {_MAX_MANIFEST_BYTES} bytes", ref=ref, digest=None
                            )
                except httpx.TransportError as exc:
                    raise transport_failure(exc, route.endpoint.netloc) from None
                return bytes(body)
            finally:
                await response.aclose()

        raw, _ = await self.first_answer(what, ref, None, routes, attempt, expected_bytes=64 << 10)
        if by_digest and "sha256:" + hashlib.sha256(raw).hexdigest() != selector:
            raise RegistryRequestError(f"{what}: manifest digest mismatch", ref=ref, digest=None)
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RegistryRequestError(f"{what}: manifest is not valid JSON", ref=ref, digest=None) from None
        if not isinstance(document, dict):
            raise RegistryRequestError(f"{what}: manifest is not a JSON object", ref=ref, digest=None)
        return document


def _host_platform() -> str:
    machine = platform.machine().lower()
    return f"linux/{_GO_ARCH.get(machine, machine)}"


def _pick_platform(ref: Reference, index: dict, wanted: str) -> str:
    os_name, _, arch = wanted.partition("/")
    arch, _, variant = arch.partition("/")
    for entry in index.get("manifests") or []:
        if not isinstance(entry, dict):
            continue
        spec = entry.get("platform") or {}
        if spec.get("os") == os_name and spec.get("architecture") == arch and (
            not variant or spec.get("variant") == variant
        ):
            digest = entry.get("digest")
            if isinstance(digest, str):
                return validate_digest(digest)
    raise RegistryRequestError(f"{ref}: image index has no manifest for platform {wanted}", ref=ref, digest=None)


def _status_hint(status: int) -> str:
    return {
        401: " (unauthorized: missing or refused credentials)",
        403: " (access denied)",
        404: " (not found)",
        429: " (rate limited)",
    }.get(status, "")


class BlobReader:
    """Ranged reads of one blob; remembers its size, the host that answered and a redirect target."""

    def __init__(self, client: RegistryClient, ref: Reference, digest: str, routes: Routes) -> None:
        self.ref = ref
        self.digest = digest
        self.size: int | None = None
        self.requests = 0
        self.bytes_read = 0
        self._client = client
        self._routes = routes
        self._host = 0  # index of the host that answered last: later reads start there
        self._redirect: tuple[int, httpx.URL] | None = None  # (host index, target) learned from a 3xx

    def __repr__(self) -> str:
        return f"BlobReader({str(self.ref)!r}, {self.digest!r}, size={self.size})"

    @property
    def redirected(self) -> bool:
        """True once the registry sent this blob elsewhere (later reads go straight there)."""
        return self._redirect is not None

    @property
    def host(self) -> str:
        """host[:port] that answered the last read (or will be asked first)."""
        return self._routes.endpoints[self._host].netloc

    def _fail(self, message: str, status: int | None = None) -> RegistryRequestError:
        return RegistryRequestError(
            f"{self.ref} blob {self.digest}: {message}", ref=self.ref, digest=self.digest, status=status
        )

    async def read_tail(self, length: int) -> tuple[bytes, int]:
        """The last `length` bytes (fewer if the blob is smaller) and the blob size, in one request."""
        if length <= 0:
            raise ValueError("read_tail needs a positive length")
        range_value = f"bytes=-{length}"

        async def consume(response: httpx.Response) -> tuple[bytes, int]:
            status = response.status_code
            if status == 416:
                total = self._unsatisfiable_total(response)
                if total == 0:
                    self.size = 0
                    return b"", 0
                raise self._fail(f"suffix range {range_value} refused (HTTP 416, blob size {total})", 416)
            if status == 206 and response.headers.get("Content-Range", "").strip() == "bytes 0--1/0":
                # docker-registry 2.8's answer for a suffix range of an empty blob
                self.size = 0
                return b"", 0
            if status == 206:
                first, last, total = self._content_range(response, range_value)
                if total is None or last != total - 1 or (last - first + 1) != min(length, total):
                    raise self._fail(
                        f"{range_value}: Content-Range {response.headers.get('Content-Range')!r}"
                        " does not answer the suffix range"
                    )
                data = await self._read_exact(response, last - first + 1)
                self.size = total
                return data, total
            if status == 200:
                declared = response.headers.get("Content-Length", "")
                if declared.strip().isdigit():
                    expect_bytes(int(declared))  # the whole blob is coming
                tail = bytearray()
                received = 0
                async for piece in self._iter_body(response):
                    received += len(piece)
                    tail += piece
                    if len(tail) > 2 * length:
                        del tail[: len(tail) - length]
                self._check_full_length(response, received)
                self.size = received
                return bytes(tail[-length:]), received
            raise self._fail(f"{range_value}: unexpected HTTP {status}", status)

        return await self._read(range_value, length, consume)

    async def read_range(self, start: int, end: int, *, up_to_end: bool = False) -> bytes:
        """Exactly the bytes [start, end) of the blob.

        `up_to_end`: `end` is an estimate that may lie past the blob's end; the answer then
        stops there (as HTTP allows), rather than failing and costing a second request.
        """
        if start < 0 or end < start:
            raise ValueError(f"invalid range [{start}, {end})")
        if up_to_end and self.size is not None:
            end = min(end, self.size)
        if start == end:
            return b""
        if self.size is not None and end > self.size:
            raise self._fail(f"range [{start}, {end}) is past the end of the blob (size {self.size})")
        range_value = f"bytes={start}-{end - 1}"

        async def consume(response: httpx.Response) -> bytes:
            status = response.status_code
            if status == 416:
                total = self._unsatisfiable_total(response)
                self.size = total if total is not None else self.size
                size_text = str(total) if total is not None else "unknown"
                raise self._fail(f"range [{start}, {end}) not satisfiable (HTTP 416, blob size {size_text})", 416)
            if status == 206:
                first, last, total = self._content_range(response, range_value)
                if total is not None:
                    self.size = total
                if first == start and last < end - 1 and total is not None and last == total - 1:
                    if up_to_end:
                        return await self._read_exact(response, last - first + 1)
                    raise self._fail(f"range [{start}, {end}) is past the end of the blob (size {total})")
                if first != start or last != end - 1:
                    raise self._fail(
                        f"{range_value}: answer has Content-Range {response.headers.get('Content-Range')!r}"
                    )
                return await self._read_exact(response, end - start)
            if status == 200:
                return await self._slice_full_body(response, start, end, up_to_end=up_to_end)
            raise self._fail(f"{range_value}: unexpected HTTP {status}", status)

        return await self._read(range_value, end - start, consume)

    # --- internals ------------------------------------------------------------------------------

    async def _read(
        self, range_value: str, expected_bytes: int, consume: Callable[[httpx.Response], Awaitable[T]]
    ) -> T:
        what = f"{self.ref} blob {self.digest}: GET {range_value}"

        async def attempt(index: int, route: Route) -> T:
            response = await self._open(index, route, range_value)
            try:
                result = await consume(response)
            except httpx.TransportError as exc:
                raise transport_failure(exc, response.request.url.netloc.decode("ascii", "replace")) from None
            finally:
                await response.aclose()
            self.requests += 1
            return result

        result, self._host = await self._client.first_answer(
            what, self.ref, self.digest, self._routes, attempt, expected_bytes=expected_bytes, start=self._host
        )
        return result

    async def _open(self, index: int, route: Route, range_value: str) -> httpx.Response:
        """Send the GET (to the learned redirect target if any), following at most one 3xx."""
        headers = {"Range": range_value}
        cached = self._redirect[1] if self._redirect is not None and self._redirect[0] == index else None
        url = cached or route.url
        response = await self._client.send(route, url, headers)
        if response.is_redirect and cached is None:
            location = response.headers.get("Location", "")
            await response.aclose()
            try:
                target = url.join(location)
            except httpx.InvalidURL:
                raise self._fail(f"GET {range_value}: redirect with an invalid Location") from None
            if target.scheme not in ("http", "https"):
                raise self._fail(f"GET {range_value}: redirect to unsupported scheme {target.scheme!r}")
            self._redirect = (index, target)
            LOG.debug("%s: redirected to %s", self.digest, target.host)
            response = await self._client.send(route, target, headers)
        status = response.status_code
        if response.is_redirect:
            await response.aclose()
            raise self._fail(f"GET {range_value}: more than one redirect (only one hop is followed)", status)
        if status >= 500:
            await response.aclose()
            raise HostFailure(f"HTTP {status}", status)
        if cached is not None and status in (401, 403, 404, 410):
            # A presigned redirect URL expired: forget it and ask the registry again.
            await response.aclose()
            self._redirect = None
            raise HostFailure(f"redirect target answered HTTP {status}", status)
        if status == 404 or (route.endpoint.mirror and status in (401, 403)):
            # This host does not have it (or will not give it to us): the next host may.
            await response.aclose()
            raise HostFailure(f"HTTP {status}{_status_hint(status)}", status, retry=False)
        if status not in (200, 206, 416):
            await response.aclose()
            raise self._fail(f"GET {range_value}: HTTP {status}{_status_hint(status)}", status)
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            await response.aclose()
            raise self._fail(f"GET {range_value}: answer is {encoding}-encoded; blob bytes expected")
        return response

    def _content_range(self, response: httpx.Response, range_value: str) -> tuple[int, int, int | None]:
        if "multipart/" in response.headers.get("Content-Type", ""):
            raise self._fail(f"{range_value}: multipart range answer not supported")
        try:
            first, last, total = parse_content_range(response.headers.get("Content-Range"))
        except ValueError as exc:
            raise self._fail(f"{range_value}: HTTP 206 with {exc}") from None
        if first is None or last is None:
            raise self._fail(f"{range_value}: HTTP 206 without a byte range in Content-Range")
        return first, last, total

    def _unsatisfiable_total(self, response: httpx.Response) -> int | None:
        try:
            return parse_content_range(response.headers.get("Content-Range"))[2]
        except ValueError:
            return None

    async def _iter_body(self, response: httpx.Response) -> AsyncIterator[bytes]:
        url = response.request.url
        async for piece in response.aiter_raw():
            made_progress()
            self.bytes_read += len(piece)
            count_bytes(url, len(piece))
            yield piece

    async def _read_exact(self, response: httpx.Response, expected: int) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) != expected:
            raise self._fail(f"Content-Length {declared} does not match the {expected}-byte range")
        body = bytearray()
        async for piece in self._iter_body(response):
            body += piece
            if len(body) > expected:
                raise self._fail(f"answer longer than the requested {expected} bytes")
        if len(body) != expected:
            raise HostFailure(f"truncated body: got {len(body)} of {expected} bytes", kind="protocol")
        return bytes(body)

    def _check_full_length(self, response: httpx.Response, received: int) -> None:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) != received:
            raise HostFailure(f"truncated body: got {received} of {declared} bytes", kind="protocol")

    async def _slice_full_body(self, response: httpx.Response, start: int, end: int, *, up_to_end: bool = False) -> bytes:
        """A 200 answered our range with the whole blob: stream to `end`, keep [start, end)."""
        expect_bytes(end)
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit():
            self.size = int(declared)
            if up_to_end:
                end = min(end, self.size)
            if end > self.size:
                raise self._fail(f"range [{start}, {end}) is past the end of the blob (size {self.size})")
        kept = bytearray()
        offset = 0
        async for piece in self._iter_body(response):
            piece_end = offset + len(piece)
            if piece_end > start and offset < end:
                kept += piece[max(0, start - offset) : min(len(piece), end - offset)]
            offset = piece_end
            if offset >= end:
                return bytes(kept)  # the rest of the body is not needed; closing drops it
        self._check_full_length(response, offset)
        self.size = offset
        if up_to_end and start < offset:
            return bytes(kept)
        raise self._fail(f"range [{start}, {end}) is past the end of the blob (size {offset})")

"""Registry client: checked ranged blob reads and manifests over one pooled httpx.AsyncClient.

Why not upstream's way: nydus-snapshotter probes (`bytes=0-0` twice) before every read and trusts
any 2xx, so a 200 full body is silently taken for the requested range. Here each read is ONE
request whose answer is validated (206 + matching Content-Range, or a 200 body sliced correctly),
auth is answered on the 401 of that same request, and a redirect learned once is reused.

What `BlobReader.requests` counts: blob-data answers that were used (2xx), one per successful
read. Not counted: 401 challenges, token requests, a 3xx hop, failed attempts that were retried.
`bytes_read` counts body bytes received in those answers (a 200 full body counts in full).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import platform
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import httpx

from stargzfs.errors import RegistryError
from stargzfs.digest import validate_digest
from stargzfs.registry.auth import AuthState, RegistryAuth
from stargzfs.registry.credentials import Credentials, resolve_credentials
from stargzfs.registry.reference import Reference, as_reference, default_scheme

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
    """Client knobs. `retries` counts extra attempts after the first (so 3 → at most 4 sends)."""

    insecure_hosts: tuple[str, ...] = ()
    timeout: float = 15.0  # per attempt: until the answer's headers, then each gap between body pieces
    auth_timeout: float = 10.0  # each token request
    retries: int = 3  # idempotent GETs on connection errors / 5xx
    backoff: float = 0.2  # base seconds, doubled per retry
    docker_config: Path | None = None


class _IdleDeadline:
    """A per-attempt deadline that data arriving pushes back.

    A fixed deadline over the whole body would fail every large read on a slow link
    (32 MiB in 15 s needs > 2 MB/s); an idle deadline still catches a server that stops
    answering or stalls mid-body, however large the body is.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope = anyio.CancelScope(deadline=anyio.current_time() + timeout)
        self.receiving = False

    def progress(self) -> None:
        self.receiving = True
        self.scope.deadline = anyio.current_time() + self.timeout

    def reason(self) -> str:
        if self.receiving:
            return f"answer stalled: no data within {self.timeout:g}s"
        return f"no answer within {self.timeout:g}s"


_CURRENT_DEADLINE: contextvars.ContextVar[_IdleDeadline | None] = contextvars.ContextVar(
    "stargzfs_registry_deadline", default=None
)


def _made_progress() -> None:
    """Headers or a body piece arrived: the current attempt's idle deadline starts over."""
    deadline = _CURRENT_DEADLINE.get()
    if deadline is not None:
        deadline.progress()


class RegistryRequestError(RegistryError):
    """A RegistryError that also says which ref/digest and HTTP status (None: no answer)."""

    def __init__(self, message: str, *, ref: Reference, digest: str | None, status: int | None = None) -> None:
        super().__init__(message)
        self.ref = ref
        self.digest = digest
        self.status = status


class _Retryable(Exception):
    """A failure worth another attempt (connection trouble, 5xx, expired redirect)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
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


def _describe_transport_error(exc: httpx.TransportError) -> str:
    """A short reason without URLs (redirect targets can carry presigned query strings)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({exc.__class__.__name__})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection closed before the whole answer arrived (truncated body or reset)"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})"
    if isinstance(exc, httpx.ReadError):
        return "connection reset while reading"
    return f"{exc.__class__.__name__}: {exc}"


def _url_for_log(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{url.path}"


class RegistryClient:
    """One pooled HTTP client plus per-repository auth state; use as `async with`."""

    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.config = config if config is not None else RegistryConfig()
        self._http: httpx.AsyncClient | None = None
        self._auth_states: dict[tuple[str, str, Credentials | None], AuthState] = {}

    async def __aenter__(self) -> "RegistryClient":
        self._http = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(self.config.timeout),
            headers={"User-Agent": "stargzfs", "Accept-Encoding": "identity"},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("RegistryClient must be used as `async with RegistryClient(...)`")
        return self._http

    def token_requests(self, ref: Reference | str) -> int:
        """Token requests made so far for ref's repository (all credential sets)."""
        reference = as_reference(ref)
        return sum(
            state.token_requests
            for (host, repository, _), state in self._auth_states.items()
            if host == reference.api_host and repository == reference.repository
        )

    def scheme(self, ref: Reference) -> str:
        return default_scheme(ref.api_host, self.config.insecure_hosts)

    def base_url(self, ref: Reference) -> str:
        return f"{self.scheme(ref)}://{ref.api_host}/v2/{ref.repository}"

    def auth_for(
        self, ref: Reference, *, credentials: Credentials | None = None, resolved: bool = False
    ) -> RegistryAuth:
        """An auth flow sharing its token cache with every other user of the same repository.

        `resolved=True`: `credentials` is already the keychain's answer (None = anonymous), so
        no config file or credential helper is consulted here (callers on an event loop resolve
        in a worker thread first).
        """
        if not resolved:
            credentials = resolve_credentials(ref, credentials, self.config.docker_config)
        key = (ref.api_host, ref.repository, credentials)
        state = self._auth_states.setdefault(key, AuthState())
        return RegistryAuth(
            ref, credentials, state=state, auth_timeout=self.config.auth_timeout, scheme=self.scheme(ref),
            insecure_hosts=self.config.insecure_hosts,
        )

    def blob(
        self, ref: Reference | str, digest: str, *, credentials: Credentials | None = None, resolved: bool = False
    ) -> "BlobReader":
        reference = as_reference(ref)
        validate_digest(digest, f" for a blob of {reference}")
        auth = self.auth_for(reference, credentials=credentials, resolved=resolved)
        return BlobReader(self, reference, digest, auth)

    # --- shared request machinery ---------------------------------------------------------------

    async def with_retries(
        self,
        what: str,
        ref: Reference,
        digest: str | None,
        attempt: Callable[[], Awaitable[T]],
    ) -> T:
        """Run `attempt` with a per-attempt deadline; retry _Retryable failures with backoff."""
        config = self.config
        last: _Retryable | None = None
        attempts = max(0, config.retries) + 1
        for number in range(attempts):
            if number:
                await anyio.sleep(config.backoff * (2 ** (number - 1)))
            deadline = _IdleDeadline(config.timeout)
            token = _CURRENT_DEADLINE.set(deadline)
            try:
                with deadline.scope:
                    return await attempt()
            except _Retryable as exc:
                last = exc
            finally:
                _CURRENT_DEADLINE.reset(token)
            if deadline.scope.cancelled_caught:
                last = _Retryable(deadline.reason())
            LOG.debug("%s: %s (attempt %d of %d)", what, last.reason, number + 1, attempts)
        assert last is not None
        raise RegistryRequestError(
            f"{what}: {last.reason} (gave up after {attempts} attempts)", ref=ref, digest=digest, status=last.status
        )

    async def send(
        self, url: httpx.URL, headers: Mapping[str, str], auth: RegistryAuth
    ) -> httpx.Response:
        """One streamed GET; transport failures become _Retryable. Caller closes the response."""
        request = self.http.build_request("GET", url, headers=dict(headers))
        try:
            response = await self.http.send(request, auth=auth, stream=True, follow_redirects=False)
        except httpx.TransportError as exc:
            raise _Retryable(_describe_transport_error(exc)) from None
        _made_progress()
        LOG.debug("GET %s %s -> %d", _url_for_log(url), headers.get("Range", ""), response.status_code)
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
        auth = self.auth_for(reference, credentials=credentials)
        document = await self._fetch_manifest(reference, reference.digest or reference.tag or "latest", auth)
        media_type = document.get("mediaType")
        if media_type in INDEX_MEDIA_TYPES or (media_type is None and "manifests" in document):
            digest = _pick_platform(reference, document, platform_spec or _host_platform())
            document = await self._fetch_manifest(reference, digest, auth)
        if not isinstance(document.get("layers"), list):
            raise RegistryRequestError(f"{reference}: manifest has no 'layers' list", ref=reference, digest=None)
        return document

    async def _fetch_manifest(self, ref: Reference, selector: str, auth: RegistryAuth) -> dict:
        url = httpx.URL(f"{self.base_url(ref)}/manifests/{selector}")
        accept = ", ".join(MANIFEST_MEDIA_TYPES + INDEX_MEDIA_TYPES)
        what = f"{ref}: GET manifest {selector}"

        async def attempt() -> bytes:
            response = await self.send(url, {"Accept": accept}, auth)
            try:
                status = response.status_code
                if status >= 500:
                    raise _Retryable(f"HTTP {status}", status)
                if status != 200:
                    raise RegistryRequestError(
                        f"{what}: HTTP {status}{_status_hint(status)}", ref=ref, digest=None, status=status
                    )
                body = bytearray()
                try:
                    async for piece in response.aiter_raw():
                        _made_progress()
                        body += piece
                        if len(body) > _MAX_MANIFEST_BYTES:
                            raise RegistryRequestError(
                                f"{what}: manifest larger than {_MAX_MANIFEST_BYTES} bytes", ref=ref, digest=None
                            )
                except httpx.TransportError as exc:
                    raise _Retryable(_describe_transport_error(exc)) from None
                return bytes(body)
            finally:
                await response.aclose()

        raw = await self.with_retries(what, ref, None, attempt)
        if selector.startswith("sha256:") and "sha256:" + hashlib.sha256(raw).hexdigest() != selector:
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
    """Ranged reads of one blob; remembers its size and a redirect target once learned."""

    def __init__(self, client: RegistryClient, ref: Reference, digest: str, auth: RegistryAuth) -> None:
        self.ref = ref
        self.digest = digest
        self.size: int | None = None
        self.requests = 0
        self.bytes_read = 0
        self._client = client
        self._auth = auth
        self._url = httpx.URL(f"{client.base_url(ref)}/blobs/{digest}")
        self._redirect: httpx.URL | None = None

    def __repr__(self) -> str:
        return f"BlobReader({str(self.ref)!r}, {self.digest!r}, size={self.size})"

    @property
    def redirected(self) -> bool:
        """True once the registry sent this blob elsewhere (later reads go straight there)."""
        return self._redirect is not None

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

        return await self._read(range_value, consume)

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

        return await self._read(range_value, consume)

    # --- internals ------------------------------------------------------------------------------

    async def _read(self, range_value: str, consume: Callable[[httpx.Response], Awaitable[T]]) -> T:
        what = f"{self.ref} blob {self.digest}: GET {range_value}"

        async def attempt() -> T:
            response = await self._open(range_value)
            try:
                result = await consume(response)
            except httpx.TransportError as exc:
                raise _Retryable(_describe_transport_error(exc)) from None
            finally:
                await response.aclose()
            self.requests += 1
            return result

        return await self._client.with_retries(what, self.ref, self.digest, attempt)

    async def _open(self, range_value: str) -> httpx.Response:
        """Send the GET (to the learned redirect target if any), following at most one 3xx."""
        headers = {"Range": range_value}
        via_cached_redirect = self._redirect is not None
        url = self._redirect or self._url
        response = await self._client.send(url, headers, self._auth)
        if response.is_redirect and not via_cached_redirect:
            location = response.headers.get("Location", "")
            await response.aclose()
            try:
                target = url.join(location)
            except httpx.InvalidURL:
                raise self._fail(f"GET {range_value}: redirect with an invalid Location") from None
            if target.scheme not in ("http", "https"):
                raise self._fail(f"GET {range_value}: redirect to unsupported scheme {target.scheme!r}")
            self._redirect = target
            LOG.debug("%s: redirected to %s", self.digest, target.host)
            response = await self._client.send(target, headers, self._auth)
        status = response.status_code
        if response.is_redirect:
            await response.aclose()
            raise self._fail(f"GET {range_value}: more than one redirect (only one hop is followed)", status)
        if status >= 500:
            await response.aclose()
            raise _Retryable(f"HTTP {status}", status)
        if via_cached_redirect and status in (401, 403, 404, 410):
            # A presigned redirect URL expired: forget it and ask the registry again.
            await response.aclose()
            self._redirect = None
            raise _Retryable(f"redirect target answered HTTP {status}", status)
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
        async for piece in response.aiter_raw():
            _made_progress()
            self.bytes_read += len(piece)
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
            raise _Retryable(f"truncated body: got {len(body)} of {expected} bytes")
        return bytes(body)

    def _check_full_length(self, response: httpx.Response, received: int) -> None:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) != received:
            raise _Retryable(f"truncated body: got {received} of {declared} bytes")

    async def _slice_full_body(self, response: httpx.Response, start: int, end: int, *, up_to_end: bool = False) -> bytes:
        """A 200 answered our range with the whole blob: stream to `end`, keep [start, end)."""
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

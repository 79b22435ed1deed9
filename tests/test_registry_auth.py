"""Credential sources and the auth flow against real docker-registries (htpasswd and auth.token)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from stargzfs.errors import RegistryError, UsageError
from stargzfs.registry import (
    CredentialCache,
    Credentials,
    RegistryClient,
    RegistryConfig,
    RegistryRequestError,
    parse_reference,
    resolve_credentials,
)
from stargzfs.registry.auth import RegistryAuth, parse_challenge
from support.registry import RegistryProcess, make_htpasswd
from support.token_server import TokenServer

REPOSITORY = "stargzfs-test/auth"
USER = "alice"
PASSWORD = "correct-horse-battery-staple"
WRONG_PASSWORD = "wrong-password-never-logged"
FAST = RegistryConfig(retries=1, backoff=0.01, timeout=10.0)


def push_blob(base_url: str, repository: str, data: bytes, headers: dict[str, str]) -> str:
    """Monolithic upload (POST then PUT ?digest=) with the given auth header; returns the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = httpx.post(f"{base_url}/v2/{repository}/blobs/uploads/", headers=headers)
    assert started.status_code == 202, started.text
    location = httpx.URL(base_url).join(started.headers["Location"]).copy_merge_params({"digest": digest})
    done = httpx.put(location, content=data, headers={**headers, "Content-Type": "application/octet-stream"})
    assert done.status_code == 201, done.text
    return digest


@dataclass
class AuthRegistry:
    registry: RegistryProcess
    digests: list[str]
    data: dict[str, bytes]

    @property
    def ref(self) -> str:
        return f"{self.registry.host}/{REPOSITORY}:latest"

    def statuses_since(self, mark: int) -> list[int]:
        return [record.status for record in self.registry.access_log()[mark:] if "/blobs/" in record.path]


def _two_blobs(seed: int) -> list[bytes]:
    generator = random.Random(seed)
    return [generator.randbytes(5000), generator.randbytes(7000)]


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    workdir = tmp_path_factory.mktemp("basic-registry")
    registry = RegistryProcess(workdir, htpasswd=make_htpasswd(workdir / "htpasswd", USER, PASSWORD))
    registry.start()
    try:
        header = {"Authorization": Credentials(USER, PASSWORD).basic_header()}
        blobs = _two_blobs(1)
        digests = [push_blob(registry.url, REPOSITORY, blob, header) for blob in blobs]
        yield AuthRegistry(registry, digests, dict(zip(digests, blobs)))
    finally:
        registry.stop()


@dataclass
class TokenRegistry(AuthRegistry):
    tokens: TokenServer


@pytest.fixture(scope="module")
def token_registry_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenRegistry]:
    tokens = TokenServer(tmp_path_factory.mktemp("token-server"), users={USER: PASSWORD}).start()
    registry = RegistryProcess(tmp_path_factory.mktemp("token-registry"), token_auth=tokens.registry_auth_config())
    registry.start()
    try:
        push_token = tokens.issue(USER, [f"repository:{REPOSITORY}:pull,push"])
        blobs = _two_blobs(2)
        digests = [push_blob(registry.url, REPOSITORY, blob, {"Authorization": f"Bearer {push_token}"})
                   for blob in blobs]
        yield TokenRegistry(registry, digests, dict(zip(digests, blobs)), tokens)
    finally:
        registry.stop()
        tokens.stop()


@pytest.fixture
def token_registry(token_registry_module: TokenRegistry) -> TokenRegistry:
    """The module's token registry with the token server's knobs reset for this test."""
    tokens = token_registry_module.tokens
    tokens.requests.clear()
    tokens.stale_tokens = 0
    tokens.token_field = "token"
    tokens.allow_anonymous = False
    return token_registry_module


def write_docker_config(directory: Path, auths: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- Credentials and sources --------------------------------------------------------------------


def test_credentials_never_show_the_secret() -> None:
    user = Credentials(USER, PASSWORD)
    token = Credentials("", "tok-123-secret")
    for shown in (repr(user), str(user), f"{user}", repr([user]), repr(token), str(token)):
        assert PASSWORD not in shown and "tok-123-secret" not in shown
    assert USER in repr(user)
    assert token.is_token and not user.is_token
    auth = RegistryAuth(parse_reference("127.0.0.1:1/x"), user)
    assert PASSWORD not in repr(auth)


def test_given_credentials_come_first(tmp_path: Path) -> None:
    ref = parse_reference("127.0.0.1:5000/a/b")
    config = write_docker_config(tmp_path, {"127.0.0.1:5000": {"auth": b64("cfg-user:cfg-pass")}})
    given = Credentials("label-user", "label-pass")
    assert resolve_credentials(ref, given, config) == given
    assert resolve_credentials(ref, None, config) == Credentials("cfg-user", "cfg-pass")
    assert resolve_credentials(ref, None, tmp_path / "missing.json") is None


def test_docker_config_forms(tmp_path: Path) -> None:
    ref = parse_reference("reg.example:5000/a")
    config = write_docker_config(tmp_path / "a", {"reg.example:5000": {"username": "u1", "password": "p1"}})
    assert resolve_credentials(ref, docker_config=config) == Credentials("u1", "p1")
    # A directory means <dir>/config.json; a URL key matches by host.
    write_docker_config(tmp_path / "b", {"https://reg.example:5000/v2/": {"auth": b64("u2:p:with:colons")}})
    assert resolve_credentials(ref, docker_config=tmp_path / "b") == Credentials("u2", "p:with:colons")
    # Identity-token-only entries are ignored, as upstream does.
    write_docker_config(tmp_path / "c", {"reg.example:5000": {"identitytoken": "idt"}})
    assert resolve_credentials(ref, docker_config=tmp_path / "c") is None
    # Other registries do not match.
    assert resolve_credentials(parse_reference("other.example/a"), docker_config=config) is None


def test_docker_hub_legacy_key(tmp_path: Path) -> None:
    config = write_docker_config(tmp_path, {"https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass")}})
    assert resolve_credentials(parse_reference("nginx"), docker_config=config) == Credentials("hubuser", "hubpass")
    assert resolve_credentials(parse_reference("index.docker.io/user/app"), docker_config=config) == Credentials(
        "hubuser", "hubpass"
    )


def test_docker_config_env_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = parse_reference("reg.example/a")
    write_docker_config(tmp_path / "home" / ".docker", {"reg.example": {"auth": b64("home:pw")}})
    write_docker_config(tmp_path / "env", {"reg.example": {"auth": b64("env:pw")}})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    assert resolve_credentials(ref) == Credentials("home", "pw")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "env"))
    assert resolve_credentials(ref) == Credentials("env", "pw")


def test_docker_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # docker-credential-* helpers are external programs we do not install: a script stands in.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-stargzfstest"
    helper.write_text(
        "#!/bin/sh\n"
        'read server\n'
        'echo "$server" > "$(dirname "$0")/asked"\n'
        'case "$server" in\n'
        '  reg.example) echo \'{"ServerURL":"reg.example","Username":"helper-user","Secret":"helper-secret"}\' ;;\n'
        '  *) echo "credentials not found in native keychain"; exit 1 ;;\n'
        "esac\n"
    )
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credsStore": "stargzfstest",
                                  "auths": {"other.example": {"auth": b64("file-user:file-pass")}}}))
    assert resolve_credentials(parse_reference("reg.example/a"), docker_config=config) == Credentials(
        "helper-user", "helper-secret"
    )
    assert (bin_dir / "asked").read_text() == "reg.example\n"
    # Not in the helper: the file's auths still count.
    assert resolve_credentials(parse_reference("other.example/a"), docker_config=config) == Credentials(
        "file-user", "file-pass"
    )
    config.write_text(json.dumps({"credHelpers": {"reg.example": "missing-helper"}}))
    with pytest.raises(UsageError, match="docker-credential-missing-helper.*not installed"):
        resolve_credentials(parse_reference("reg.example/a"), docker_config=config)


@pytest.mark.parametrize(
    "content, complaint",
    [
        ("{not json", "not valid JSON"),
        ('{"auths": []}', "'auths' is not an object"),
        ('{"auths": {"reg.example": {"auth": "%%%secretish%%%"}}}', "invalid base64"),
        ('{"auths": {"reg.example": {"auth": "' + b64("no-colon-secret") + '"}}}', "not base64(user:password)"),
    ],
)
def test_broken_docker_config_is_a_usage_error(tmp_path: Path, content: str, complaint: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(UsageError) as caught:
        resolve_credentials(parse_reference("reg.example/a"), docker_config=path)
    message = str(caught.value)
    assert complaint in message and str(path) in message
    assert "secretish" not in message and "no-colon-secret" not in message


def test_parse_challenge() -> None:
    challenge = parse_challenge('Bearer realm="https://auth.example/token",service="registry.example",'
                                'scope="repository:a/b:pull"')
    assert challenge is not None and challenge.scheme == "bearer"
    assert challenge.params == {"realm": "https://auth.example/token", "service": "registry.example",
                                "scope": "repository:a/b:pull"}
    basic = parse_challenge('Basic realm="stargzfs-test"')
    assert basic is not None and basic.scheme == "basic" and basic.params == {"realm": "stargzfs-test"}
    assert parse_challenge("") is None


async def test_credential_cache_runs_the_helper_once_and_labels_need_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-counting"
    helper.write_text('#!/bin/sh\necho run >> "$(dirname "$0")/runs"\n'
                      'echo \'{"Username":"helper-user","Secret":"helper-secret"}\'\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {"reg.example": "counting"}}))
    cache = CredentialCache(config)
    ref = parse_reference("reg.example/a")
    assert await cache.resolve(ref) == Credentials("helper-user", "helper-secret")
    assert await cache.resolve(ref) == Credentials("helper-user", "helper-secret")
    assert (bin_dir / "runs").read_text() == "run\n" and cache.lookups == 1
    given = Credentials(USER, PASSWORD)
    assert await cache.resolve(parse_reference("reg.example/b"), given) == given
    assert cache.lookups == 1 and "helper-secret" not in repr(cache)


# --- plain-http token realms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "realm, insecure, allowed",
    [
        ("https://auth.example/token", (), True),
        ("http://auth.example/token", (), False),
        ("http://auth.example:8080/token", (), False),
        ("http://auth.example/token", ("auth.example",), True),
        ("http://auth.example:8080/token", ("auth.example:8080",), True),
        ("http://auth.example:8080/token", ("other.example",), False),
        ("http://127.0.0.1:5001/token", (), True),
        ("http://localhost/token", (), True),
        ("http://10.1.2.3/token", (), True),
        ("http://192.168.7.7/token", (), True),
        ("http://172.32.0.1/token", (), False),
        ("http://8.8.8.8/token", (), False),
    ],
)
def test_plain_http_realm_only_for_local_or_insecure_hosts(
    realm: str, insecure: tuple[str, ...], allowed: bool
) -> None:
    auth = RegistryAuth(parse_reference("registry.example/a"), Credentials(USER, PASSWORD), insecure_hosts=insecure)
    if allowed:
        request = auth._token_request(realm, "svc")
        assert request.url.host == httpx.URL(realm).host
        return
    with pytest.raises(RegistryError) as caught:
        auth._token_request(realm, "svc")
    message = str(caught.value)
    assert f"host {httpx.URL(realm).netloc.decode()}" in message and "plain-http" in message
    assert PASSWORD not in message and b64(f"{USER}:{PASSWORD}") not in message and USER not in message


async def test_https_registry_challenge_naming_a_plain_http_realm_sends_nothing() -> None:
    auth = RegistryAuth(parse_reference("registry.example/a"), Credentials(USER, PASSWORD))
    flow = auth.async_auth_flow(httpx.Request("GET", "https://registry.example/v2/a/blobs/sha256:" + "0" * 64))
    request = await flow.__anext__()
    assert "Authorization" not in request.headers
    challenge = httpx.Response(
        401, request=request,
        headers={"WWW-Authenticate": 'Bearer realm="http://auth.example/token",service="registry.example"'},
    )
    with pytest.raises(RegistryError, match="plain-http Bearer realm host auth.example"):
        await flow.asend(challenge)  # raised before any token request is yielded


# --- Basic (htpasswd) -----------------------------------------------------------------------------


async def test_basic_auth_from_docker_config(basic_registry: AuthRegistry, tmp_path: Path) -> None:
    config = write_docker_config(tmp_path, {basic_registry.registry.host: {"auth": b64(f"{USER}:{PASSWORD}")}})
    first, second = basic_registry.digests
    mark = basic_registry.registry.mark()
    async with RegistryClient(RegistryConfig(docker_config=config)) as client:
        reader = client.blob(basic_registry.ref, first)
        assert await reader.read_range(0, 100) == basic_registry.data[first][:100]
        assert basic_registry.statuses_since(mark) == [401, 206]  # challenge answered in the flow
        mark = basic_registry.registry.mark()
        data, size = await client.blob(basic_registry.ref, second).read_tail(10)
    assert (data, size) == (basic_registry.data[second][-10:], len(basic_registry.data[second]))
    assert basic_registry.statuses_since(mark) == [206]  # Basic is now sent up front
    assert reader.requests == 1


async def test_basic_auth_refusals(basic_registry: AuthRegistry) -> None:
    digest = basic_registry.digests[0]
    async with RegistryClient(FAST) as client:
        with pytest.raises(RegistryRequestError) as anonymous:
            await client.blob(basic_registry.ref, digest).read_tail(10)
        wrong = Credentials(USER, WRONG_PASSWORD)
        with pytest.raises(RegistryRequestError) as refused:
            await client.blob(basic_registry.ref, digest, credentials=wrong).read_tail(10)
    assert anonymous.value.status == 401 and "unauthorized" in str(anonymous.value)
    assert refused.value.status == 401 and digest in str(refused.value)
    assert WRONG_PASSWORD not in str(refused.value) and b64(f"{USER}:{WRONG_PASSWORD}") not in str(refused.value)


# --- Bearer (auth.token) --------------------------------------------------------------------------


async def test_bearer_flow_with_given_credentials_and_token_cache(token_registry: TokenRegistry) -> None:
    given = Credentials(USER, PASSWORD)
    first, second = token_registry.digests
    mark = token_registry.registry.mark()
    async with RegistryClient() as client:
        data, size = await client.blob(token_registry.ref, first, credentials=given).read_tail(64)
        assert token_registry.statuses_since(mark) == [401, 206]
        mark = token_registry.registry.mark()
        other = client.blob(token_registry.ref, second, credentials=given)
        assert await other.read_range(10, 20) == token_registry.data[second][10:20]
        assert token_registry.statuses_since(mark) == [206]  # cached token, no new challenge
        assert client.token_requests(token_registry.ref) == 1
    assert (data, size) == (token_registry.data[first][-64:], len(token_registry.data[first]))
    assert [(r.scope, r.user, r.account) for r in token_registry.tokens.requests] == [
        (f"repository:{REPOSITORY}:pull", USER, USER)
    ]


async def test_concurrent_reads_share_one_token(token_registry: TokenRegistry) -> None:
    import trio

    credentials = Credentials(USER, PASSWORD)
    results: dict[str, bytes] = {}
    async with RegistryClient() as client:

        async def read(digest: str) -> None:
            results[digest] = await client.blob(token_registry.ref, digest, credentials=credentials).read_range(0, 32)

        async with trio.open_nursery() as nursery:
            for digest in token_registry.digests * 2:
                nursery.start_soon(read, digest)
    assert results == {digest: token_registry.data[digest][:32] for digest in token_registry.digests}
    assert len(token_registry.tokens.requests) == 1


async def test_bearer_anonymous_with_access_token_field(token_registry: TokenRegistry) -> None:
    token_registry.tokens.allow_anonymous = True
    token_registry.tokens.token_field = "access_token"
    digest = token_registry.digests[0]
    async with RegistryClient() as client:
        assert await client.blob(token_registry.ref, digest).read_range(0, 8) == token_registry.data[digest][:8]
    assert [r.user for r in token_registry.tokens.requests] == [None]


async def test_refused_token_is_refreshed_exactly_once(token_registry: TokenRegistry) -> None:
    credentials = Credentials(USER, PASSWORD)
    digest = token_registry.digests[0]
    token_registry.tokens.stale_tokens = 1  # the first token is already expired for the registry
    mark = token_registry.registry.mark()
    async with RegistryClient() as client:
        reader = client.blob(token_registry.ref, digest, credentials=credentials)
        # challenge -> stale token -> refused -> one refresh -> success
        assert await reader.read_range(0, 8) == token_registry.data[digest][:8]
        assert token_registry.statuses_since(mark) == [401, 401, 206]
        assert len(token_registry.tokens.requests) == 2
        assert await reader.read_range(8, 16) == token_registry.data[digest][8:16]  # cached good token
        assert len(token_registry.tokens.requests) == 2
        assert reader.requests == 2
        token_registry.tokens.stale_tokens = 100
        other = RegistryClient()
        async with other:
            with pytest.raises(RegistryRequestError) as caught:
                await other.blob(token_registry.ref, digest, credentials=credentials).read_tail(8)
    assert caught.value.status == 401
    assert len(token_registry.tokens.requests) == 4  # the second client: a token + one refresh, then stop
    assert str(caught.value).count("HTTP 401") == 1  # not "401": the port may contain it


async def test_wrong_password_at_the_token_endpoint(token_registry: TokenRegistry) -> None:
    async with RegistryClient(FAST) as client:
        with pytest.raises(RegistryError) as caught:
            await client.blob(token_registry.ref, token_registry.digests[0],
                              credentials=Credentials(USER, WRONG_PASSWORD)).read_tail(8)
    message = str(caught.value)
    assert "token request" in message and "credentials refused" in message and REPOSITORY in message
    assert WRONG_PASSWORD not in message
    assert [r.status for r in token_registry.tokens.requests] == [401]


async def test_token_mode_uses_the_secret_as_bearer(token_registry: TokenRegistry) -> None:
    token = token_registry.tokens.issue("robot", [f"repository:{REPOSITORY}:pull"])
    digest = token_registry.digests[1]
    mark = token_registry.registry.mark()
    async with RegistryClient() as client:
        reader = client.blob(token_registry.ref, digest, credentials=Credentials("", token))
        assert await reader.read_range(0, 8) == token_registry.data[digest][:8]
    assert token_registry.tokens.requests == []
    assert token_registry.statuses_since(mark) == [206]


async def test_secrets_stay_out_of_logs(
    token_registry: TokenRegistry, basic_registry: AuthRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token_registry.tokens.stale_tokens = 1
    async with RegistryClient(FAST) as client:
        await client.blob(token_registry.ref, token_registry.digests[0],
                          credentials=Credentials(USER, PASSWORD)).read_tail(8)
        await client.blob(basic_registry.ref, basic_registry.digests[0],
                          credentials=Credentials(USER, PASSWORD)).read_tail(8)
        with pytest.raises(RegistryError):
            await client.blob(basic_registry.ref, basic_registry.digests[0],
                              credentials=Credentials(USER, WRONG_PASSWORD)).read_tail(8)
    assert caplog.records, "the flow should log at DEBUG"
    secrets = [PASSWORD, WRONG_PASSWORD, b64(f"{USER}:{PASSWORD}"), b64(f"{USER}:{WRONG_PASSWORD}")]
    secrets += token_registry.tokens.issued
    assert len(token_registry.tokens.issued) >= 1
    text = caplog.text + "".join(repr(record.args) for record in caplog.records)
    for secret in secrets:
        assert secret not in text

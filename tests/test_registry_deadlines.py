"""Deadlines that hold and secrets that stay put, against real registries behind a fault proxy.

A server dripping one byte every half second, a token endpoint doing the same, a 401 whose body
never ends, a redirect to a presigned URL, a cookie: each through support.fault_proxy in front of
the real docker-registry (or the real token server). Timing assertions are generous sanity bounds
on the deadline feature, not measurements.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator

import pytest
import trio

from stargzfs.cli import main
from stargzfs.errors import RegistryError
from stargzfs.registry import Credentials, RegistryClient, RegistryConfig, RegistryRequestError
from support.fault_proxy import COOKIE, SIGNATURE, FaultProxy
from support.images import upload_blob
from support.registry import RegistryProcess
from support.token_server import TokenServer

REPOSITORY = "stargzfs-test/deadlines"
SANITY_BOUND = 30.0  # seconds: far above every deadline below, far below "forever"
PASSWORD = "deadline-password-never-logged"


@pytest.fixture(scope="module")
def blob(registry: RegistryProcess) -> tuple[str, bytes]:
    data = random.Random(31).randbytes(150_000)
    return upload_blob(registry, REPOSITORY, data), data


def ref(host: str) -> str:
    return f"{host}/{REPOSITORY}:latest"


async def test_dripping_registry_fails_within_its_deadline_while_others_answer(
    registry: RegistryProcess, blob: tuple[str, bytes], fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    digest, data = blob
    drip = fault_proxy_factory(registry.host, "drip:0.5")
    config = RegistryConfig(timeout=2.0, retries=0, min_rate=65536)  # 64 KiB: 2 s + 1 s
    finished: list[str] = []
    failure: list[BaseException] = []
    async with RegistryClient(config) as client:

        async def dripping() -> None:
            try:
                await client.blob(ref(drip.host), digest).read_tail(65536)
            except RegistryError as exc:
                failure.append(exc)
            finished.append("drip")

        async def healthy() -> None:
            assert await client.blob(ref(registry.host), digest).read_range(0, 1000) == data[:1000]
            finished.append("healthy")

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dripping)
            await trio.sleep(0.3)  # the drip has begun
            nursery.start_soon(healthy)
        elapsed = time.monotonic() - started
    assert finished == ["healthy", "drip"]
    assert elapsed < SANITY_BOUND
    message = str(failure[0])
    assert "transfer not complete within its 3s deadline" in message and digest in message
    assert len(drip.seen) == 1


def test_toc_against_a_dripping_registry_exits_4_in_time(
    registry: RegistryProcess, blob: tuple[str, bytes], fault_proxy_factory: Callable[..., FaultProxy],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The hardening issue's case: `--registry-timeout 2 --registry-retries 0` used to hang."""
    drip = fault_proxy_factory(registry.host, "drip:0.5")
    started = time.monotonic()
    code = main(["toc", ref(drip.host), blob[0], "--registry-timeout", "2", "--registry-retries", "0"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 4 and err.count("\n") == 1 and "deadline" in err
    assert elapsed < SANITY_BOUND  # 2 s + 64 KiB at the default 16 KiB/s: about 6 s


async def test_stalled_body_still_hits_the_idle_timeout(
    registry: RegistryProcess, blob: tuple[str, bytes], fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    stall = fault_proxy_factory(registry.host, "stall")
    async with RegistryClient(RegistryConfig(timeout=0.5, retries=0)) as client:
        with pytest.raises(RegistryError, match=r"stalled: no data within 0.5s"):
            await client.blob(ref(stall.host), blob[0]).read_range(0, 100_000)


@pytest.fixture
def dripping_token_registry(
    registry_factory: Callable[..., RegistryProcess], registry: RegistryProcess,
    fault_proxy_factory: Callable[..., FaultProxy], tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RegistryProcess, TokenServer, FaultProxy]]:
    tokens = TokenServer(tmp_path_factory.mktemp("tokens"), users={"alice": PASSWORD}).start()
    try:
        realm_proxy = fault_proxy_factory(f"127.0.0.1:{tokens.port}")
        auth = {**tokens.registry_auth_config(), "realm": f"{realm_proxy.url}/token"}
        yield registry_factory(token_auth=auth, seed_from=registry), tokens, realm_proxy
    finally:
        tokens.stop()


async def test_token_request_has_a_deadline(
    dripping_token_registry: tuple[RegistryProcess, TokenServer, FaultProxy], blob: tuple[str, bytes],
) -> None:
    token_registry, tokens, realm = dripping_token_registry
    realm.fault = "drip:0.5"
    config = RegistryConfig(timeout=10.0, auth_timeout=1.0, retries=0)
    started = time.monotonic()
    async with RegistryClient(config) as client:
        with pytest.raises(RegistryError) as caught:
            await client.blob(ref(token_registry.host), blob[0], credentials=Credentials("alice", PASSWORD)).read_tail(10)
    assert time.monotonic() - started < SANITY_BOUND
    assert "token answer from 127.0.0.1 not complete within 1s" in str(caught.value)
    assert len(tokens.requests) == 1 and PASSWORD not in str(caught.value)


async def test_endless_401_body_is_capped(
    registry: RegistryProcess, blob: tuple[str, bytes], fault_proxy_factory: Callable[..., FaultProxy]
) -> None:
    endless = fault_proxy_factory(registry.host, "endless-401")
    async with RegistryClient(RegistryConfig(timeout=5.0, retries=0)) as client:
        with pytest.raises(RegistryError, match="401 answer is larger than 65536 bytes"):
            await client.blob(ref(endless.host), blob[0], credentials=Credentials("u", "p")).read_tail(10)


async def test_signed_redirect_urls_and_cookies_stay_out_of_logs_errors_and_later_requests(
    registry: RegistryProcess, blob: tuple[str, bytes], fault_proxy_factory: Callable[..., FaultProxy],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    digest, data = blob
    storage = fault_proxy_factory(registry.host, host="localhost")  # the "S3" the registry sends us to
    front = fault_proxy_factory(registry.host)
    front.faults = ["set-cookie", f"signed-redirect:{storage.url}", f"signed-redirect:{storage.url}"]
    async with RegistryClient(RegistryConfig(timeout=5.0, retries=0)) as client:
        assert await client.blob(ref(front.host), digest).read_range(0, 10) == data[:10]  # sets the cookie
        reader = client.blob(ref(front.host), digest)
        assert await reader.read_range(10, 20) == data[10:20]  # via the signed URL
        storage.fault = "status:500"
        with pytest.raises(RegistryRequestError) as caught:
            await client.blob(ref(front.host), digest).read_range(20, 30)
    assert any(SIGNATURE in seen.path for seen in storage.seen)  # the signed URL really was used
    assert all("Cookie" not in seen.headers for seen in front.seen[1:] + storage.seen)
    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)
    assert "redirected to localhost" in logged  # the redirect is logged, its query is not
    for secret in (SIGNATURE, "X-Amz-Credential", COOKIE):
        assert secret not in logged and secret not in str(caught.value)


@pytest.mark.parametrize(
    "argv, complaint",
    [
        (["toc", "127.0.0.1:99999999999999999999/x/y:t", "sha256:" + "0" * 64], "port 99999999999999999999"),
        (["toc", "127.0.0.1:0/x", "sha256:" + "0" * 64], "port 0 is not in 1-65535"),
        (["toc", "reg\0istry:5000/x", "sha256:" + "0" * 64], "invalid image reference"),
        (["toc", "127.0.0.1:5000/x", "sha256:" + "0" * 63 + "\0"], "digest"),
        (["toc", "127.0.0.1:5000/x", "sha256:" + "0" * 64, "--insecure-registry", "bad host"], "--insecure-registry"),
        (["toc", "127.0.0.1:5000/x", "sha256:" + "0" * 64, "--hosts-dir", "certs\0.d"], "NUL byte"),
        (["toc", "127.0.0.1:5000/x", "sha256:" + "0" * 64, "--registry-min-rate", "0"], "bytes per second"),
    ],
)
def test_malformed_input_is_exit_2_and_one_line(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exited:  # argparse's own (one-line) errors
        code = exited.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and complaint in err and "Traceback" not in err

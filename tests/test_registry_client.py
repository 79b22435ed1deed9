"""Ranged blob reads and manifests against a real docker-registry, plus injected faults.

Faults come from a small real HTTP proxy in front of the real registry, so every answer that is
not a fault is the registry's own.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from stargzfs.errors import RegistryError, UsageError
from stargzfs.registry import (
    Credentials,
    RegistryClient,
    RegistryConfig,
    RegistryRequestError,
    parse_reference,
)
from support.fault_proxy import TRICKLE_GAP, TRICKLE_PIECES, FaultProxy
from support.registry import RegistryProcess

REPOSITORY = "stargzfs-test/registry-client"
FAST = RegistryConfig(retries=2, backoff=0.01, timeout=5.0)


def push_blob(base_url: str, repository: str, data: bytes, headers: dict[str, str] | None = None) -> str:
    """Monolithic upload (POST then PUT ?digest=); returns the digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = httpx.post(f"{base_url}/v2/{repository}/blobs/uploads/", headers=headers)
    assert started.status_code == 202, started.text
    location = httpx.URL(base_url).join(started.headers["Location"]).copy_merge_params({"digest": digest})
    done = httpx.put(location, content=data, headers={**(headers or {}), "Content-Type": "application/octet-stream"})
    assert done.status_code == 201, done.text
    return digest


@dataclass
class PushedBlob:
    data: bytes
    digest: str

    @property
    def size(self) -> int:
        return len(self.data)


@pytest.fixture(scope="session")
def pushed_blob(registry: RegistryProcess) -> PushedBlob:
    data = random.Random(7).randbytes(300_000)
    return PushedBlob(data, push_blob(registry.url, REPOSITORY, data))


def blob_ref(host: str) -> str:
    return f"{host}/{REPOSITORY}:latest"


# --- plain reads against the real registry ------------------------------------------------------


async def test_read_tail_is_one_suffix_request(registry: RegistryProcess, pushed_blob: PushedBlob) -> None:
    since = registry.mark()
    async with RegistryClient() as client:
        reader = client.blob(blob_ref(registry.host), pushed_blob.digest)
        assert reader.size is None
        data, size = await reader.read_tail(65536)
    assert size == pushed_blob.size == reader.size
    assert data == pushed_blob.data[-65536:]
    assert reader.requests == 1
    assert reader.bytes_read == 65536
    log = registry.requests_for(pushed_blob.digest, since)
    assert [(record.method, record.status) for record in log] == [("GET", 206)]


async def test_read_tail_longer_than_blob_returns_whole_blob(
    registry: RegistryProcess, pushed_blob: PushedBlob
) -> None:
    async with RegistryClient() as client:
        reader = client.blob(blob_ref(registry.host), pushed_blob.digest)
        data, size = await reader.read_tail(pushed_blob.size + 1000)
    assert data == pushed_blob.data
    assert size == pushed_blob.size


async def test_read_range_exact_bytes(registry: RegistryProcess, pushed_blob: PushedBlob) -> None:
    async with RegistryClient() as client:
        reader = client.blob(blob_ref(registry.host), pushed_blob.digest)
        assert await reader.read_range(0, 1) == pushed_blob.data[:1]
        assert await reader.read_range(12345, 23456) == pushed_blob.data[12345:23456]
        last = await reader.read_range(pushed_blob.size - 10, pushed_blob.size)
        assert await reader.read_range(5, 5) == b""
    assert last == pushed_blob.data[-10:]
    assert reader.size == pushed_blob.size
    assert reader.requests == 3  # the empty range costs nothing


async def test_range_past_end_names_range_and_size(registry: RegistryProcess, pushed_blob: PushedBlob) -> None:
    size = pushed_blob.size
    async with RegistryClient() as client:
        # Unknown size: the registry answers 416 for a start past the end.
        reader = client.blob(blob_ref(registry.host), pushed_blob.digest)
        with pytest.raises(RegistryError) as unsatisfiable:
            await reader.read_range(size + 10, size + 20)
        # Straddling the end: a 206 shorter than asked must not pass as the range.
        reader = client.blob(blob_ref(registry.host), pushed_blob.digest)
        with pytest.raises(RegistryError) as straddling:
            await reader.read_range(size - 5, size + 5)
    for caught in (unsatisfiable, straddling):
        message = str(caught.value)
        assert f"size {size}" in message
        assert pushed_blob.digest in message
        assert REPOSITORY in message
    assert "HTTP 416" in str(unsatisfiable.value)
    assert f"[{size + 10}, {size + 20})" in str(unsatisfiable.value)


async def test_missing_blob_is_a_clear_error(registry: RegistryProcess) -> None:
    digest = "sha256:" + "0" * 64
    async with RegistryClient() as client:
        with pytest.raises(RegistryRequestError) as caught:
            await client.blob(blob_ref(registry.host), digest).read_tail(51)
    assert caught.value.status == 404
    assert "not found" in str(caught.value) and digest in str(caught.value)
    assert caught.value.exit_code == 4


async def test_manifest_and_index(registry: RegistryProcess, pushed_blob: PushedBlob) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    config_digest = push_blob(registry.url, REPOSITORY, config.encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": pushed_blob.digest,
                    "size": pushed_blob.size}],
    }
    manifest_raw = json.dumps(manifest).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
    put = httpx.put(f"{registry.url}/v2/{REPOSITORY}/manifests/single", content=manifest_raw,
                    headers={"Content-Type": manifest["mediaType"]})
    assert put.status_code == 201, put.text
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": manifest["mediaType"], "digest": manifest_digest, "size": len(manifest_raw),
                       "platform": {"os": "linux", "architecture": "riscv64"}}],
    }
    put = httpx.put(f"{registry.url}/v2/{REPOSITORY}/manifests/multi", content=json.dumps(index).encode(),
                    headers={"Content-Type": index["mediaType"]})
    assert put.status_code == 201, put.text
    async with RegistryClient() as client:
        assert await client.get_manifest(f"{registry.host}/{REPOSITORY}:single") == manifest
        by_digest = await client.get_manifest(f"{registry.host}/{REPOSITORY}@{manifest_digest}")
        assert by_digest == manifest
        resolved = await client.get_manifest(f"{registry.host}/{REPOSITORY}:multi", platform_spec="linux/riscv64")
        assert resolved == manifest
        with pytest.raises(RegistryError, match="no manifest for platform linux/s390x"):
            await client.get_manifest(f"{registry.host}/{REPOSITORY}:multi", platform_spec="linux/s390x")
        with pytest.raises(RegistryError, match="not found"):
            await client.get_manifest(f"{registry.host}/{REPOSITORY}:no-such-tag")


# --- faults: a real proxy in front of the real registry -----------------------------------------


@pytest.fixture
def proxy_factory(fault_proxy_factory: Callable[..., FaultProxy]) -> Callable[..., FaultProxy]:
    return fault_proxy_factory


@pytest.fixture
def proxy(fault_proxy_factory: Callable[..., FaultProxy], registry: RegistryProcess) -> FaultProxy:
    return fault_proxy_factory(registry.host)


async def test_5xx_then_success_is_retried(proxy: FaultProxy, pushed_blob: PushedBlob) -> None:
    proxy.faults = ["503", "503"]
    async with RegistryClient(FAST) as client:
        reader = client.blob(blob_ref(proxy.host), pushed_blob.digest)
        data, size = await reader.read_tail(100)
    assert (data, size) == (pushed_blob.data[-100:], pushed_blob.size)
    assert len(proxy.seen) == 3
    assert reader.requests == 1  # only the answer that was used


async def test_persistent_5xx_gives_up_with_a_clear_error(proxy: FaultProxy, pushed_blob: PushedBlob) -> None:
    proxy.faults = ["503"] * 10
    async with RegistryClient(FAST) as client:
        with pytest.raises(RegistryRequestError) as caught:
            await client.blob(blob_ref(proxy.host), pushed_blob.digest).read_range(0, 10)
    message = str(caught.value)
    assert "HTTP 503" in message and "gave up after 3 attempts" in message
    assert pushed_blob.digest in message and REPOSITORY in message and "bytes=0-9" in message
    assert caught.value.status == 503
    assert len(proxy.seen) == 3


async def test_connection_reset_is_retried_then_reported(proxy: FaultProxy, pushed_blob: PushedBlob) -> None:
    proxy.faults = ["reset"]
    async with RegistryClient(FAST) as client:
        assert await client.blob(blob_ref(proxy.host), pushed_blob.digest).read_range(3, 9) == pushed_blob.data[3:9]
        proxy.faults = ["reset"] * 10
        with pytest.raises(RegistryError, match=r"(reset|closed).*gave up after 3 attempts"):
            await client.blob(blob_ref(proxy.host), pushed_blob.digest).read_range(3, 9)


async def test_200_instead_of_206_is_sliced_correctly(proxy: FaultProxy, pushed_blob: PushedBlob) -> None:
    proxy.faults = ["full200", "full200", "full200"]
    async with RegistryClient(FAST) as client:
        reader = client.blob(blob_ref(proxy.host), pushed_blob.digest)
        middle = await reader.read_range(1000, 1010)
        tail, size = await reader.read_tail(51)
        past_end = client.blob(blob_ref(proxy.host), pushed_blob.digest)
        with pytest.raises(RegistryError, match=f"past the end of the blob \\(size {pushed_blob.size}\\)"):
            await past_end.read_range(pushed_blob.size - 1, pushed_blob.size + 1)
    assert middle == pushed_blob.data[1000:1010]
    assert (tail, size) == (pushed_blob.data[-51:], pushed_blob.size)
    assert reader.size == pushed_blob.size
    assert reader.requests == 2


async def test_truncated_body_is_an_error(proxy: FaultProxy, pushed_blob: PushedBlob) -> None:
    proxy.faults = ["truncate"]
    async with RegistryClient(FAST) as client:
        # Once: the retry heals it.
        healed = await client.blob(blob_ref(proxy.host), pushed_blob.digest).read_range(0, 5000)
        assert healed == pushed_blob.data[:5000]
        proxy.faults = ["truncate"] * 10
        with pytest.raises(RegistryError, match="truncated") as caught:
            await client.blob(blob_ref(proxy.host), pushed_blob.digest).read_range(0, 5000)
    assert pushed_blob.digest in str(caught.value)


async def test_hanging_server_times_out(proxy: FaultProxy, pushed_blob: PushedBlob) -> None:
    proxy.faults = ["hang"] * 5
    config = RegistryConfig(retries=1, backoff=0.01, timeout=0.5)
    async with RegistryClient(config) as client:
        with pytest.raises(RegistryError, match="within 0.5s|timed out") as caught:
            await client.blob(blob_ref(proxy.host), pushed_blob.digest).read_tail(51)
    assert "gave up after 2 attempts" in str(caught.value)


async def test_slow_but_steady_body_outlasts_the_timeout(proxy: FaultProxy, pushed_blob: PushedBlob) -> None:
    """The deadline covers the wait for an answer and each gap in the body, not the whole transfer."""
    proxy.faults = ["trickle"]
    config = RegistryConfig(retries=0, backoff=0.01, timeout=TRICKLE_PIECES * TRICKLE_GAP * 2 / 3)
    async with RegistryClient(config) as client:
        reader = client.blob(blob_ref(proxy.host), pushed_blob.digest)
        assert await reader.read_range(1000, 201_000) == pushed_blob.data[1000:201_000]
    assert reader.requests == 1 and len(proxy.seen) == 1


async def test_body_that_stalls_midway_times_out(proxy: FaultProxy, pushed_blob: PushedBlob) -> None:
    proxy.faults = ["stall"] * 5
    config = RegistryConfig(retries=1, backoff=0.01, timeout=0.5)
    async with RegistryClient(config) as client:
        with pytest.raises(RegistryError, match="stalled: no data within 0.5s") as caught:
            await client.blob(blob_ref(proxy.host), pushed_blob.digest).read_range(0, 200_000)
    assert "gave up after 2 attempts" in str(caught.value) and len(proxy.seen) == 2


async def test_redirect_is_followed_once_and_reused_without_authorization(
    proxy_factory: Callable[..., FaultProxy], registry: RegistryProcess, pushed_blob: PushedBlob
) -> None:
    # The "CDN" is another host name (localhost vs 127.0.0.1), serving the blob from the registry.
    cdn = proxy_factory(registry.host, host="localhost")
    cdn_base = cdn.url
    front = proxy_factory(registry.host)
    front.faults = [f"redirect:{cdn_base}"]
    token = "registry-token-must-not-leak"

    async with RegistryClient(FAST) as client:
        reader = client.blob(blob_ref(front.host), pushed_blob.digest, credentials=Credentials("", token))
        first = await reader.read_range(0, 100)
        second, size = await reader.read_tail(100)
    assert first == pushed_blob.data[:100]
    assert (second, size) == (pushed_blob.data[-100:], pushed_blob.size)
    assert reader.redirected
    assert len(front.seen) == 1  # later reads go straight to the redirect target
    assert front.seen[0].headers.get("Authorization") == f"Bearer {token}"
    assert len(cdn.seen) == 2
    assert all("Authorization" not in seen.headers for seen in cdn.seen)
    assert reader.requests == 2


async def test_expired_redirect_falls_back_to_the_registry(
    proxy_factory: Callable[..., FaultProxy], registry: RegistryProcess, pushed_blob: PushedBlob
) -> None:
    cdn = proxy_factory(registry.host, host="localhost")
    front = proxy_factory(registry.host)
    front.faults = [f"redirect:{cdn.url}"]
    async with RegistryClient(FAST) as client:
        reader = client.blob(blob_ref(front.host), pushed_blob.digest)
        assert await reader.read_range(0, 10) == pushed_blob.data[:10]
        cdn.faults = ["status:403"]  # the presigned URL expired
        assert await reader.read_range(10, 20) == pushed_blob.data[10:20]
    assert len(front.seen) == 2 and len(cdn.seen) == 2
    assert not reader.redirected  # the registry answered directly the second time


async def test_second_redirect_hop_is_refused(
    proxy_factory: Callable[..., FaultProxy], registry: RegistryProcess, pushed_blob: PushedBlob
) -> None:
    second = proxy_factory(registry.host, host="localhost")
    second.faults = ["redirect:http://127.0.0.1:9"]
    first = proxy_factory(registry.host)
    first.faults = [f"redirect:{second.url}"]
    async with RegistryClient(FAST) as client:
        with pytest.raises(RegistryError, match="more than one redirect"):
            await client.blob(blob_ref(first.host), pushed_blob.digest).read_tail(51)


async def test_config_and_usage_errors(pushed_blob: PushedBlob) -> None:
    async with RegistryClient() as client:
        with pytest.raises(UsageError, match="invalid digest"):
            client.blob("127.0.0.1:1/x", "sha256:short")
        reader = client.blob("127.0.0.1:1/x", pushed_blob.digest)
        with pytest.raises(ValueError):
            await reader.read_range(10, 5)
        with pytest.raises(ValueError):
            await reader.read_tail(0)
    assert parse_reference("127.0.0.1:1/x").repository == "x"
    with pytest.raises(RuntimeError, match="async with"):
        RegistryClient().http

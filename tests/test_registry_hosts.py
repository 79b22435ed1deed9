"""containerd's hosts.toml: how it is read, and mirrors tried in order against real docker-registries.

The mirror is a second docker-registry configured as a pull-through cache (`proxy: remoteurl:`) of
the session registry; failing hosts are a closed port, an empty registry (404) and fault proxies
(5xx), whose `seen` lists show exactly what each host was asked and with which headers.
"""

from __future__ import annotations

import base64
import json
import random
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from stargzfs.cli import main
from stargzfs.registry import Credentials, HostsConfigError, HostsDirectory, RegistryClient, RegistryConfig
from stargzfs.registry.hosts import Endpoint, TlsSettings
from support.fault_proxy import FaultProxy
from support.images import FileSpec, PushedImage, build_image, upload_blob
from support.registry import RegistryProcess

REPOSITORY = "stargzfs-test/hosts"
FAST = dict(retries=1, backoff=0.01, timeout=5.0)


def write_hosts(root: Path, dirname: str, text: str) -> Path:
    directory = root / dirname
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(text)
    return root


def closed_port() -> str:
    """host:port nobody listens on (connection refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def blob(registry: RegistryProcess) -> tuple[str, bytes]:
    data = random.Random(13).randbytes(200_000)
    return upload_blob(registry, REPOSITORY, data), data


@pytest.fixture(scope="module")
def pull_through(registry: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> RegistryProcess:
    """A docker-registry that is a pull-through cache of the session registry."""
    mirror = RegistryProcess(tmp_path_factory.mktemp("pull-through"), proxy_remote=registry.url)
    mirror.start()
    yield mirror
    mirror.stop()


def stargzfs_requests(registry: RegistryProcess, since: int) -> list:
    return [record for record in registry.access_log()[since:] if record.user_agent == "stargzfs"]


# --- reading hosts.toml ---------------------------------------------------------------------------


def test_directory_names_are_tried_as_containerd_does(tmp_path: Path) -> None:
    hosts = HostsDirectory(tmp_path)
    assert hosts.endpoints("reg.example:5000") == [Endpoint("https", "reg.example:5000", "/v2")]
    write_hosts(tmp_path, "_default", 'server = "https://fallback.example"\n')
    assert [e.netloc for e in hosts.endpoints("reg.example:5000")] == ["fallback.example"]
    write_hosts(tmp_path, "reg.example:5000", 'server = "https://colon.example"\n')
    assert [e.netloc for e in hosts.endpoints("reg.example:5000")] == ["colon.example"]
    write_hosts(tmp_path, "reg.example_5000_", 'server = "https://underscore.example"\n')
    assert [e.netloc for e in hosts.endpoints("reg.example:5000")] == ["underscore.example"]
    # other registries only see _default
    assert [e.netloc for e in hosts.endpoints("other.example")] == ["fallback.example"]


def test_hosts_in_file_order_then_the_server(tmp_path: Path) -> None:
    write_hosts(tmp_path, "docker.io", """
[host."https://zz-first.example"]
  capabilities = ["pull"]
  ca = "first-ca.pem"
  client = [["client.pem", "client.key"], "both.pem"]
  skip_verify = false
  [host."https://zz-first.example".header]
    x-mirror = ["a", "b"]
[host."mirror.example:5000/base"]
  capabilities = ["pull", "resolve"]
[host."https://compat.example/v2/upstream"]
  override_path = true
[host."http://aa-last.example/v2"]
""")
    endpoints = HostsDirectory(tmp_path).endpoints("docker.io")
    directory = tmp_path / "docker.io"
    assert [(e.scheme, e.netloc, e.path, e.mirror) for e in endpoints] == [
        ("https", "zz-first.example", "/v2", True),
        ("https", "mirror.example:5000", "/base/v2", True),
        ("https", "compat.example", "/v2/upstream", True),
        ("http", "aa-last.example", "/v2", True),
        ("https", "registry-1.docker.io", "/v2", False),  # no server: Hub's API host
    ]
    first = endpoints[0]
    assert first.capabilities == {"pull"} and not first.can("resolve")
    assert first.tls == TlsSettings((directory / "first-ca.pem",),
                                    ((directory / "client.pem", directory / "client.key"), (directory / "both.pem", None)))
    assert first.headers == (("x-mirror", "a"), ("x-mirror", "b"))
    assert endpoints[1].capabilities == {"pull", "resolve"}
    assert endpoints[3].capabilities == {"pull", "resolve", "push"}


def test_server_scheme_path_and_root_settings(tmp_path: Path) -> None:
    write_hosts(tmp_path, "10.1.2.3:5000", 'server = "registry.internal:8443"\nca = "/etc/x/ca.pem"\nskip_verify = true\n')
    (server,) = HostsDirectory(tmp_path).endpoints("10.1.2.3:5000")
    assert (server.scheme, server.netloc, server.path) == ("https", "registry.internal:8443", "/v2")
    assert server.tls == TlsSettings((Path("/etc/x/ca.pem"),), (), True) and server.mirror
    # without server: the registry itself, with the usual plain-HTTP rule for private addresses
    write_hosts(tmp_path, "10.9.9.9:5000", 'ca = "ca.pem"\n')
    (own,) = HostsDirectory(tmp_path).endpoints("10.9.9.9:5000")
    assert (own.scheme, own.netloc, own.mirror) == ("http", "10.9.9.9:5000", False)
    # a scheme-less host follows the reference rule (--insecure-registry included)
    write_hosts(tmp_path, "reg.example", '[host."mirror.example"]\n[host."127.0.0.1:5001"]\n')
    schemes = [(e.scheme, e.netloc) for e in HostsDirectory(tmp_path, ("mirror.example",)).endpoints("reg.example")]
    assert schemes == [("http", "mirror.example"), ("http", "127.0.0.1:5001"), ("https", "reg.example")]


def test_docker_cert_files_when_there_is_no_hosts_toml(tmp_path: Path) -> None:
    directory = tmp_path / "reg.example"
    directory.mkdir()
    for name in ("a.crt", "b.crt", "me.cert", "me.key", "lone.cert", "notes.txt"):
        (directory / name).write_text("x")
    (endpoint,) = HostsDirectory(tmp_path).endpoints("reg.example")
    assert endpoint.tls.ca_files == (directory / "a.crt", directory / "b.crt")
    assert endpoint.tls.client_pairs == ((directory / "lone.cert", None), (directory / "me.cert", directory / "me.key"))


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("server = [1", "not valid TOML"),
        ('servr = "https://x"', "unknown key servr"),
        ('[host."https://m"]\ncapabilities = ["pull", "fly"]', "unknown capability 'fly'"),
        ('[host."ftp://m"]', "must be http(s)://"),
        ('[host."https://m:99999"]', "invalid host or port"),
        ('[host."https://user:pw@m"]', "must not carry credentials"),
        ('[host."https://m"]\nskip_verify = "yes"', "skip_verify must be true or false"),
        ('[host."https://m"]\nclient = [["a", "b", "c"]]', "client entries must be paths or [cert, key] pairs"),
        ('[host."https://m".header]\nAuthorization = "Bearer x"', "set by stargzfs itself"),
        ('[host."https://m".header]\n"x-bad\\nname" = "v"', "must be a token"),
    ],
)
def test_bad_hosts_toml_names_file_and_key(tmp_path: Path, text: str, complaint: str) -> None:
    write_hosts(tmp_path, "reg.example", text)
    with pytest.raises(HostsConfigError) as caught:
        HostsDirectory(tmp_path).endpoints("reg.example")
    message = str(caught.value)
    assert complaint in message and str(tmp_path / "reg.example" / "hosts.toml") in message
    assert caught.value.exit_code == 2 and "\n" not in message


# --- mirrors against real registries --------------------------------------------------------------


async def test_down_and_failing_mirrors_fall_back_to_a_pull_through_cache(
    registry: RegistryProcess, pull_through: RegistryProcess, blob: tuple[str, bytes],
    fault_proxy_factory: Callable[..., FaultProxy], tmp_path: Path,
) -> None:
    digest, data = blob
    busy = fault_proxy_factory(registry.host, "503")
    resolve_only = fault_proxy_factory(registry.host)
    hosts = write_hosts(tmp_path, registry.host, f"""
server = "{registry.url}"
[host."{resolve_only.url}"]
  capabilities = ["resolve"]
[host."{busy.url}"]
  capabilities = ["pull"]
[host."http://{closed_port()}"]
  capabilities = ["pull"]
[host."{pull_through.url}"]
  capabilities = ["pull", "resolve"]
""")
    upstream_mark, mirror_mark = registry.mark(), pull_through.mark()
    async with RegistryClient(RegistryConfig(hosts_dir=hosts, **FAST)) as client:
        reader = client.blob(f"{registry.host}/{REPOSITORY}:latest", digest)
        tail, size = await reader.read_tail(1000)
        middle = await reader.read_range(5000, 9000)
    assert (tail, size, middle) == (data[-1000:], len(data), data[5000:9000])
    assert reader.host == pull_through.host and reader.requests == 2
    assert resolve_only.seen == []  # no "pull" capability: never asked for blobs
    assert len(busy.seen) == 1  # the second read started at the host that answered
    mirrored = stargzfs_requests(pull_through, mirror_mark)
    assert [r.path for r in mirrored] == [f"/v2/{REPOSITORY}/blobs/{digest}"] * 2
    assert all(r.query == f"ns={registry.host.replace(':', '%3A')}" for r in mirrored)  # containerd's ?ns=
    assert stargzfs_requests(registry, upstream_mark) == []  # only the cache fetched from upstream
    assert registry.requests_for(digest, upstream_mark)  # ... which it did


async def test_mirror_without_the_blob_falls_back_to_the_server(
    registry: RegistryProcess, registry_factory: Callable[..., RegistryProcess], blob: tuple[str, bytes],
    tmp_path: Path,
) -> None:
    digest, data = blob
    empty = registry_factory()
    hosts = write_hosts(tmp_path, f"{registry.host.replace(':', '_')}_",
                        f'[host."{empty.url}"]\n  capabilities = ["pull"]\n')
    mark = registry.mark()
    async with RegistryClient(RegistryConfig(hosts_dir=hosts, **FAST)) as client:
        reader = client.blob(f"{registry.host}/{REPOSITORY}:latest", digest)
        assert await reader.read_range(0, 10) == data[:10]
    assert [r.status for r in stargzfs_requests(empty, 0) if "/blobs/" in r.path] == [404]
    assert [r.status for r in stargzfs_requests(registry, mark)] == [206]
    assert reader.host == registry.host


async def test_every_host_failing_names_each_one(
    registry: RegistryProcess, blob: tuple[str, bytes], fault_proxy_factory: Callable[..., FaultProxy],
    tmp_path: Path,
) -> None:
    busy = fault_proxy_factory(registry.host, "503")
    down = closed_port()
    hosts = write_hosts(tmp_path, "_default", f'server = "http://{down}"\n[host."{busy.url}"]\n')
    async with RegistryClient(RegistryConfig(hosts_dir=hosts, retries=1, backoff=0.01, timeout=2.0)) as client:
        with pytest.raises(Exception) as caught:
            await client.blob(f"{registry.host}/{REPOSITORY}:latest", blob[0]).read_tail(10)
    message = str(caught.value)
    assert f"mirror {busy.host}: HTTP 503" in message and f"cannot connect to {down}" in message
    assert "gave up after 2 attempts" in message and caught.value.exit_code == 4
    assert len(busy.seen) == 2


async def test_credentials_are_looked_up_for_the_host_contacted(
    registry: RegistryProcess, blob: tuple[str, bytes], fault_proxy_factory: Callable[..., FaultProxy],
    tmp_path: Path,
) -> None:
    digest, data = blob
    front = fault_proxy_factory(registry.host)  # "the registry" of the reference
    mirror = fault_proxy_factory(registry.host, "require-basic", host="localhost")
    hosts = write_hosts(tmp_path / "certs.d", front.host, f"""
[host."{mirror.url}"]
  capabilities = ["pull"]
  [host."{mirror.url}".header]
    X-Mirror-Route = "from-hosts-toml"
""")
    docker = tmp_path / "docker"
    docker.mkdir()
    mirror_basic = b64("mirror-user:mirror-pass")
    (docker / "config.json").write_text(json.dumps({"auths": {mirror.host: {"auth": mirror_basic}}}))
    # token mode sends the label's secret up front, which shows where it goes
    label = Credentials("", "label-secret-for-the-registry-only")
    config = RegistryConfig(hosts_dir=hosts, docker_config=docker / "config.json", **FAST)
    async with RegistryClient(config) as client:
        first = client.blob(f"{front.host}/{REPOSITORY}:latest", digest, credentials=label, resolved=True)
        assert await first.read_range(0, 4) == data[:4]
        mirror.fault = "503"
        second = client.blob(f"{front.host}/{REPOSITORY}:latest", digest, credentials=label, resolved=True)
        assert await second.read_range(4, 8) == data[4:8]
    assert (first.host, second.host) == (mirror.host, front.host)
    # the mirror challenged, then got the credentials docker's config holds for the mirror's host
    assert [seen.headers.get("Authorization") for seen in mirror.seen] == [None, f"Basic {mirror_basic}",
                                                                          f"Basic {mirror_basic}"]
    assert all(seen.headers.get("X-Mirror-Route") == "from-hosts-toml" for seen in mirror.seen)
    # the label's secret went to the registry only, and the mirror's header did not
    assert [seen.headers.get("Authorization") for seen in front.seen] == [f"Bearer {label.secret}"]
    assert "X-Mirror-Route" not in front.seen[0].headers


@pytest.fixture(scope="module")
def small_estargz(containerd, registry: RegistryProcess, image_cache) -> PushedImage:  # type: ignore[no-untyped-def]
    files = [FileSpec("etc", "dir"), FileSpec("etc/hosts-test.txt", data=b"mirrored\n" * 100)]
    return image_cache.get(("test_registry_hosts", "gzip"),
                           lambda: build_image(containerd, registry, "registry-hosts/small", [files]))


def test_toc_through_a_mirror_keeps_to_two_requests(
    small_estargz: PushedImage, registry: RegistryProcess, pull_through: RegistryProcess, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    layer = small_estargz.layers[0]
    hosts = write_hosts(tmp_path, registry.host, f'[host."{pull_through.url}"]\n  capabilities = ["pull"]\n')
    upstream_mark, mirror_mark = registry.mark(), pull_through.mark()
    assert main(["toc", small_estargz.ref, layer.digest, "--hosts-dir", str(hosts),
                 "--toc-digest", layer.toc_digest]) == 0
    assert "1 request" in capsys.readouterr().out
    assert len(stargzfs_requests(pull_through, mirror_mark)) == 1
    assert stargzfs_requests(registry, upstream_mark) == []

"""TLS as the host is configured, against real HTTPS docker-registries with openssl-made certificates.

Trust comes from a hosts.toml `ca`, or from the system store after installing the test CA with
update-ca-certificates (and removing it again); one registry requires a client certificate; others
serve an expired certificate or one for another name. Every failure is exit 4 / one line naming the
host and the reason.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from stargzfs.cli import main
from stargzfs.registry import RegistryClient, RegistryConfig, RegistryRequestError
from support.images import upload_blob
from support.pki import Issued, TestPki, system_trust, unverified_context
from support.registry import RegistryProcess, RegistryTls

REPOSITORY = "stargzfs-test/tls"
FAST = dict(retries=0, backoff=0.01, timeout=5.0)


@dataclass
class TlsWorld:
    pki: TestPki
    client: Issued
    digest: str
    data: bytes
    good: RegistryProcess  # certificate for 127.0.0.1 signed by the test CA
    mutual: RegistryProcess  # ... and it requires a client certificate from the test CA
    expired: RegistryProcess
    wrong_name: RegistryProcess

    def ref(self, registry: RegistryProcess) -> str:
        return f"{registry.host}/{REPOSITORY}:latest"


@pytest.fixture(scope="module")
def tls_world(registry: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsWorld]:
    pki = TestPki(tmp_path_factory.mktemp("pki"))
    data = random.Random(21).randbytes(100_000)
    digest = upload_blob(registry, REPOSITORY, data)
    now = datetime.now(timezone.utc)
    server = pki.issue("server")
    client = pki.issue("client", client=True)
    expired = pki.issue("expired", valid_from=now - timedelta(days=10), valid_until=now - timedelta(days=5))
    wrong = pki.issue("wrong-name", dns=("wrong.example",), ips=())
    settings = {
        "good": RegistryTls(server.cert, server.key, pki.client_context()),
        "mutual": RegistryTls(server.cert, server.key, pki.client_context(client), client_cas=(pki.ca,)),
        "expired": RegistryTls(expired.cert, expired.key, unverified_context()),
        "wrong_name": RegistryTls(wrong.cert, wrong.key, unverified_context()),
    }
    started: dict[str, RegistryProcess] = {}
    try:
        for name, tls in settings.items():
            process = RegistryProcess(tmp_path_factory.mktemp(f"tls-{name}"), tls=tls)
            process.seed_from(registry)
            process.start()
            started[name] = process
        yield TlsWorld(pki, client, digest, data, **started)
    finally:
        for process in started.values():
            process.stop()


def hosts_dir(tmp_path: Path, registry: RegistryProcess, extra: str = "") -> Path:
    """hosts.toml saying the registry speaks https (a loopback registry is plain HTTP by default)."""
    directory = tmp_path / "certs.d" / registry.host
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(f'server = "https://{registry.host}"\n{extra}')
    return tmp_path / "certs.d"


async def read_head(world: TlsWorld, registry: RegistryProcess, hosts: Path) -> bytes:
    async with RegistryClient(RegistryConfig(hosts_dir=hosts, **FAST)) as client:
        return await client.blob(world.ref(registry), world.digest).read_range(0, 64)


async def refused(world: TlsWorld, registry: RegistryProcess, hosts: Path) -> str:
    with pytest.raises(RegistryRequestError) as caught:
        await read_head(world, registry, hosts)
    message = str(caught.value)
    assert f"TLS with {registry.host}" in message and caught.value.exit_code == 4
    return message


async def test_ca_from_hosts_toml_relative_to_it(tls_world: TlsWorld, tmp_path: Path) -> None:
    hosts = hosts_dir(tmp_path, tls_world.good, 'ca = "test-ca.pem"\n')
    shutil.copyfile(tls_world.pki.ca, hosts / tls_world.good.host / "test-ca.pem")
    assert await read_head(tls_world, tls_world.good, hosts) == tls_world.data[:64]
    # the control: the same hosts.toml without `ca` is refused (the test CA is in no other store)
    assert "unknown CA" in await refused(tls_world, tls_world.good, hosts_dir(tmp_path / "bare", tls_world.good))


async def test_system_store_as_update_ca_certificates_leaves_it(tls_world: TlsWorld, tmp_path: Path) -> None:
    hosts = hosts_dir(tmp_path, tls_world.good)  # no `ca`: only the system store can vouch
    assert "certificate not trusted: unknown CA" in await refused(tls_world, tls_world.good, hosts)
    with system_trust(tls_world.pki.ca):
        assert await read_head(tls_world, tls_world.good, hosts) == tls_world.data[:64]
    assert "unknown CA" in await refused(tls_world, tls_world.good, hosts)  # removed again


async def test_client_certificate_from_hosts_toml(tls_world: TlsWorld, tmp_path: Path) -> None:
    mutual = tls_world.mutual
    copied = tmp_path / "client"
    copied.mkdir()
    shutil.copyfile(tls_world.client.cert, copied / "client.cert")
    shutil.copyfile(tls_world.client.key, copied / "client.key")
    (copied / "both.pem").write_bytes(tls_world.client.cert.read_bytes() + tls_world.client.key.read_bytes())
    message = await refused(tls_world, mutual, hosts_dir(tmp_path / "none", mutual, f'ca = "{tls_world.pki.ca}"\n'))
    assert "client certificate" in message
    pair = hosts_dir(tmp_path / "pair", mutual,
                     f'ca = "{tls_world.pki.ca}"\nclient = [["{copied}/client.cert", "{copied}/client.key"]]\n')
    assert await read_head(tls_world, mutual, pair) == tls_world.data[:64]
    single = hosts_dir(tmp_path / "single", mutual, f'ca = ["{tls_world.pki.ca}"]\nclient = "{copied}/both.pem"\n')
    assert await read_head(tls_world, mutual, single) == tls_world.data[:64]


async def test_expired_and_wrong_name_certificates(tls_world: TlsWorld, tmp_path: Path) -> None:
    ca = f'ca = "{tls_world.pki.ca}"\n'
    assert "certificate expired" in await refused(tls_world, tls_world.expired,
                                                  hosts_dir(tmp_path / "e", tls_world.expired, ca))
    assert "wrong name" in await refused(tls_world, tls_world.wrong_name,
                                         hosts_dir(tmp_path / "w", tls_world.wrong_name, ca))
    # skip_verify accepts both, as containerd's does
    for registry in (tls_world.expired, tls_world.wrong_name):
        hosts = hosts_dir(tmp_path / registry.host, registry, "skip_verify = true\n")
        assert await read_head(tls_world, registry, hosts) == tls_world.data[:64]


def test_cli_tls_failure_is_exit_4_and_one_line(
    tls_world: TlsWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hosts = hosts_dir(tmp_path, tls_world.good)
    code = main(["toc", tls_world.ref(tls_world.good), tls_world.digest, "--hosts-dir", str(hosts),
                 "--registry-retries", "0"])
    err = capsys.readouterr().err
    assert code == 4 and err.count("\n") == 1 and "Traceback" not in err
    assert f"TLS with {tls_world.good.host}: certificate not trusted: unknown CA" in err


@pytest.mark.parametrize("content, complaint", [("not a certificate\n", "holds no usable PEM certificate"),
                                                (None, "does not exist")])
def test_unusable_ca_file_is_a_usage_error(
    tls_world: TlsWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, complaint: str
) -> None:
    hosts = hosts_dir(tmp_path, tls_world.good, 'ca = "broken.pem"\n')
    if content is not None:
        (hosts / tls_world.good.host / "broken.pem").write_text(content)
    code = main(["toc", tls_world.ref(tls_world.good), tls_world.digest, "--hosts-dir", str(hosts)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and complaint in err and "broken.pem" in err


def test_mount_gives_eio_naming_the_tls_reason_then_converts_with_the_ca(
    tls_world: TlsWorld, registry: RegistryProcess, registry_factory, containerd, image_cache, snapdb,  # type: ignore[no-untyped-def]
    daemons, tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    import errno

    from support.snapshot_root import ChainLayer, SnapshotRoot, hex_of, lstat_errno, status, write_root
    from support.stacks import stacked_image

    image = stacked_image(image_cache, containerd, registry, "gzip")
    certificate = tls_world.pki.issue("mount")
    https = registry_factory(tls=RegistryTls(certificate.cert, certificate.key, tls_world.pki.client_context()),
                             seed_from=registry)  # seeded now that the image exists
    layer = image.layers[0]
    ref = f"{https.host}/{image.repository}:{image.tag}"
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root",
                                                      {"a": [ChainLayer(ref, layer.digest, layer.toc_digest)],
                                                       "b": [ChainLayer(ref, layer.digest, layer.toc_digest)]}))
    untrusted = daemons(root.root, "--hosts-dir", hosts_dir(tmp_path / "no-ca", https), "--registry-retries", "0")
    assert lstat_errno(untrusted.mountpoint / root.sid("a") / hex_of(layer.digest)) == errno.EIO
    error = status(root.root)[root.sid("a")]["layer_error"]
    assert f"TLS with {https.host}: certificate not trusted: unknown CA" in error
    trusted = daemons(root.root, "--hosts-dir", hosts_dir(tmp_path / "ca", https, f'ca = "{tls_world.pki.ca}"\n'))
    assert lstat_errno(trusted.mountpoint / root.sid("b") / hex_of(layer.digest)) == 0

"""Registries as a real `stargzfs mount` meets them: metrics, hosts.toml from the config file,
a crawling registry and a presigned redirect.

The metrics endpoint is scraped while the daemon serves, and its registry counters are checked
against the docker-registry's own access log; the conversion counters and state.json against what
the lookups did.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.fault_proxy import SIGNATURE, FaultProxy
from support.images import PushedImage
from support.registry import RegistryProcess, free_port
from support.snapshot_root import ChainLayer, Daemon, SnapshotRoot, hex_of, image_chain, lstat_errno, status, write_root
from support.stacks import stacked_image

SANITY_BOUND = 60.0


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def registry_counters(samples: dict, host: str) -> tuple[float, float, float]:
    """(2xx answers, 4xx answers, body bytes) the daemon counted for `host`."""
    return (value(samples, "stargzfs_registry_requests_total", host=host, status_class="2xx"),
            value(samples, "stargzfs_registry_requests_total", host=host, status_class="4xx"),
            value(samples, "stargzfs_registry_bytes_total", host=host))


def access_log_counters(registry: RegistryProcess) -> tuple[int, int, int]:
    records = [r for r in registry.access_log() if r.user_agent == "stargzfs"]
    return (sum(1 for r in records if 200 <= r.status < 300), sum(1 for r in records if 400 <= r.status < 500),
            sum(r.bytes for r in records if 200 <= r.status < 300))


@pytest.fixture(scope="module")
def image(containerd, registry: RegistryProcess, image_cache) -> PushedImage:  # type: ignore[no-untyped-def]
    return stacked_image(image_cache, containerd, registry, "gzip")


def make_root(snapdb, tmp_path: Path, chains: dict[str, list[ChainLayer]]) -> SnapshotRoot:  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    return SnapshotRoot(root, write_root(snapdb, root, chains))


def test_metrics_during_a_mount_match_the_registry_access_log(
    image: PushedImage, registry_factory: Callable[..., RegistryProcess], registry: RegistryProcess, snapdb,
    daemons: Callable[..., Daemon], tmp_path: Path,
) -> None:
    # a registry of its own, so its access log holds exactly this daemon's requests
    own = registry_factory(seed_from=registry)
    ref = f"{own.host}/{image.repository}:{image.tag}"
    root = make_root(snapdb, tmp_path, {"img": image_chain(image, ref)})
    address = f"127.0.0.1:{free_port()}"
    daemon = daemons(root.root, "--metrics-address", address)
    before = scrape(address)
    assert value(before, "stargzfs_conversions_total", result="converted") == 0
    assert value(before, "stargzfs_phase_duration_seconds_count", phase="toc_fetch") == 0

    hexes = [hex_of(layer.digest) for layer in image.layers]
    assert lstat_errno(daemon.mountpoint / root.sid("img", 0) / hexes[0]) == 0
    first = scrape(address)
    assert value(first, "stargzfs_conversions_total", result="converted") == 1
    assert value(first, "stargzfs_bootstraps_served_total") == 1
    assert value(first, "stargzfs_phase_duration_seconds_count", phase="toc_fetch") == 1
    assert value(first, "stargzfs_phase_duration_seconds_count", phase="build") == 1
    assert registry_counters(first, own.host) == access_log_counters(own)
    assert access_log_counters(own)[0] in (1, 2)  # at most two requests for a layer

    top = len(hexes) - 1
    with open(daemon.mountpoint / root.sid("img", top) / "image.boot", "rb") as handle:
        assert handle.read(1024)
    after = scrape(address)
    assert value(after, "stargzfs_conversions_total", result="converted") == len(hexes)
    assert value(after, "stargzfs_image_boots_served_total") == 1
    assert value(after, "stargzfs_phase_duration_seconds_count", phase="merge") == 1
    assert value(after, "stargzfs_conversions_total", result="error") == 0
    assert registry_counters(after, own.host) == access_log_counters(own)
    assert value(after, "stargzfs_phase_duration_seconds_sum", phase="build") > 0

    rows = status(root.root)
    for index, digest_hex in enumerate(hexes):
        row = rows[root.sid("img", index)]
        toc = root.fs("img", index) / "stargz.index.json"
        assert row["layer_status"] == "converted" and row["convert_seconds"] > 0
        assert row["toc_bytes"] == toc.stat().st_size

    # lazy blob serving: chunks fetched, then served again from the cache, and every byte counted
    blob = daemon.mountpoint / ".blobs" / hexes[0]
    served = len(blob.read_bytes())
    lazy = scrape(address)
    fetched = value(lazy, "stargzfs_chunks_fetched_total")
    assert fetched > 0 and value(lazy, "stargzfs_chunk_bytes_total") == served
    assert registry_counters(lazy, own.host) == access_log_counters(own)
    with open(blob, "rb", buffering=0) as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # past the kernel's page cache
        assert len(handle.read()) == served
    again = scrape(address)
    assert value(again, "stargzfs_chunks_fetched_total") == fetched  # nothing fetched twice
    assert value(again, "stargzfs_chunk_cache_hits_total") > value(lazy, "stargzfs_chunk_cache_hits_total")


def test_crawling_registry_gives_eio_in_time_and_signed_urls_stay_out_of_the_log(
    image: PushedImage, registry: RegistryProcess, fault_proxy_factory: Callable[..., FaultProxy], snapdb,
    daemons: Callable[..., Daemon], tmp_path: Path,
) -> None:
    drip = fault_proxy_factory(registry.host, "drip:0.5")
    storage = fault_proxy_factory(registry.host, host="localhost")
    signing = fault_proxy_factory(registry.host, f"signed-redirect:{storage.url}")
    layers = image.layers
    root = make_root(snapdb, tmp_path, {
        "drip": [ChainLayer(f"{drip.host}/{image.repository}:{image.tag}", layers[0].digest, layers[0].toc_digest)],
        "signed": [ChainLayer(f"{signing.host}/{image.repository}:{image.tag}", layers[1].digest,
                              layers[1].toc_digest)],
        "probe": [ChainLayer(image.ref, layers[2].digest, layers[2].toc_digest)],
    })
    daemon = daemons(root.root, "--registry-timeout", "2", "--registry-retries", "0",
                     "--registry-min-rate", "65536")  # each request: 2 s + 64 KiB at 64 KiB/s
    probe_dir = root.fs("probe") / "probe"
    probe_dir.mkdir()
    outcome: list[tuple[int, float]] = []

    def crawl() -> None:
        started = time.monotonic()
        outcome.append((lstat_errno(daemon.mountpoint / root.sid("drip") / hex_of(layers[0].digest)),
                        time.monotonic() - started))

    looker = threading.Thread(target=crawl)
    looker.start()
    deadline = time.monotonic() + 10
    while not drip.seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert drip.seen, "the conversion never reached the dripping registry"
    for number in range(3):  # other names answer while the drip goes on
        (probe_dir / f"fresh-{number}").write_bytes(b"x" * number)
        assert os.stat(daemon.mountpoint / root.sid("probe") / "probe" / f"fresh-{number}").st_size == number
        assert looker.is_alive()
    looker.join(SANITY_BOUND)
    assert outcome and outcome[0][0] == errno.EIO and outcome[0][1] < SANITY_BOUND
    assert "deadline" in status(root.root)[root.sid("drip")]["layer_error"]

    assert lstat_errno(daemon.mountpoint / root.sid("signed") / hex_of(layers[1].digest)) == 0
    assert any(SIGNATURE in seen.path for seen in storage.seen)
    log = daemon.log_text()
    assert "redirected to localhost" in log  # the daemon logs at debug here
    assert SIGNATURE not in log and "X-Amz-" not in log


def test_mirrors_and_metrics_address_from_the_snapshotter_config(
    image: PushedImage, registry: RegistryProcess, registry_factory: Callable[..., RegistryProcess], snapdb,
    daemons: Callable[..., Daemon], tmp_path: Path,
) -> None:
    mirror = registry_factory(proxy_remote=registry.url)
    hosts = tmp_path / "certs.d" / registry.host
    hosts.mkdir(parents=True)
    down = f"127.0.0.1:{free_port()}"
    (hosts / "hosts.toml").write_text(f'[host."http://{down}"]\n[host."{mirror.url}"]\n')
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'[remote.mirrors_config]\ndir = "{tmp_path / "certs.d"}"\n[metrics]\naddress = ":{port}"\n')
    layer = image.layers[3]
    root = make_root(snapdb, tmp_path, {"m": [ChainLayer(image.ref, layer.digest, layer.toc_digest)]})
    upstream_mark = registry.mark()
    daemon = daemons(root.root, "--config", config)
    assert lstat_errno(daemon.mountpoint / root.sid("m") / hex_of(layer.digest)) == 0
    from_mirror = [r for r in mirror.access_log() if r.user_agent == "stargzfs"]
    assert len(from_mirror) == 1 and from_mirror[0].path.endswith(layer.digest)
    assert [r for r in registry.access_log()[upstream_mark:] if r.user_agent == "stargzfs"] == []
    samples = scrape(f"127.0.0.1:{port}")  # ":PORT" listens on loopback
    assert value(samples, "stargzfs_registry_errors_total", host=down, reason="connect") == 1
    assert value(samples, "stargzfs_registry_requests_total", host=mirror.host, status_class="2xx") == 1


@pytest.mark.parametrize("address, complaint", [("127.0.0.1:0", "port in 1-65535"),
                                                ("example.com:9100", "IP address or localhost")])
def test_bad_metrics_address_fails_the_mount(
    image: PushedImage, snapdb, tmp_path: Path, address: str, complaint: str  # type: ignore[no-untyped-def]
) -> None:
    import subprocess

    from support.snapshot_root import STARGZFS

    root = make_root(snapdb, tmp_path, {"x": image_chain(image)[:1]})
    (tmp_path / "mnt").mkdir()
    done = subprocess.run([STARGZFS, "mount", str(root.root), str(tmp_path / "mnt"), "--metrics-address", address],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and complaint in done.stderr

"""stargzfs.metrics on its own: addresses, the endpoint, the phase timer (the daemon's use of them
is tested through a real mount in test_registry_mount.py)."""

from __future__ import annotations

import httpx
import pytest
import trio
from prometheus_client import REGISTRY

from stargzfs import metrics
from stargzfs.errors import UsageError
from support.registry import free_port


@pytest.mark.parametrize(
    "text, expected",
    [("9110", ("127.0.0.1", 9110)), (":9110", ("127.0.0.1", 9110)), ("0.0.0.0:80", ("0.0.0.0", 80)),
     ("[::1]:9110", ("::1", 9110)), ("localhost:1", ("localhost", 1))],
)
def test_addresses_default_to_loopback(text: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":", "host.example:9110", "127.0.0.1:65536", "127.0.0.1:-1", ":٣"])
def test_bad_addresses_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="metrics address"):
        metrics.parse_address(text)


def test_endpoint_serves_prometheus_text_and_a_taken_port_is_refused() -> None:
    port = free_port()
    server = metrics.serve(f":{port}")
    try:
        assert server.address == ("127.0.0.1", port)
        metrics.CHUNK_CACHE_HITS.inc(0)  # defined for lazy blob serving, exported from the start
        answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        for name in ("stargzfs_conversions_total", "stargzfs_phase_duration_seconds_bucket",
                     "stargzfs_chunks_fetched_total", "stargzfs_chunk_cache_hits_total", "stargzfs_chunk_bytes_total",
                     "stargzfs_bootstraps_served_total", "stargzfs_image_boots_served_total"):
            assert name in answer.text
        with pytest.raises(UsageError, match="cannot listen"):
            metrics.MetricsServer(f"127.0.0.1:{port}")
    finally:
        server.close()


async def test_timed_measures_the_coroutine_failures_included() -> None:
    def sample(suffix: str) -> float:
        return REGISTRY.get_sample_value(f"stargzfs_phase_duration_seconds_{suffix}", {"phase": "merge"}) or 0.0

    count, total = sample("count"), sample("sum")

    @metrics.timed("merge")
    async def work(fail: bool) -> str:
        await trio.sleep(0.05)
        if fail:
            raise RuntimeError("boom")
        return "done"

    assert await work(False) == "done"
    with pytest.raises(RuntimeError):
        await work(True)
    assert sample("count") == count + 2 and sample("sum") - total >= 0.1
    with pytest.raises(ValueError):
        metrics.timed("toc_parse")

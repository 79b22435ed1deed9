"""Faults through a real mount: kill -9 at random points, and a storm of parallel stats.

Real parts only: `stargzfs mount` daemons started by the CLI, the real builder, a real
docker-registry, metadata.db from containerd's storage code. Each test asserts what
docs/reliability.md promises: nothing partial is ever visible (before or after a remount),
every layer is converted exactly once per (layer, TOC), and the rest of the mount keeps
answering meanwhile.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import threading
import time
from pathlib import Path

import pytest
from support.crafted import crafted_layer, sha256
from support.fault_proxy import SIGNATURE
from support.images import upload_blob
from support.registry import RegistryProcess
from support.snapshot_root import (
    ChainLayer,
    SnapshotRoot,
    hex_of,
    image_chain,
    image_cli_ok,
    write_root,
)
from support.stacks import stacked_image
from support.storm import stat_storm

from stargzfs.rafs.check import check_bootstrap
from stargzfs.snapshots import layout

SEED = 20261204
TEMP = re.compile(r"^\.?(converting|merging)-stargz")


def _layers(registry: RegistryProcess, tag: str, count: int) -> list[ChainLayer]:
    """`count` distinct crafted layers, each with a few files, pushed to the real registry."""
    chain = []
    for index in range(count):
        files = {f"{tag}/{index}/file{n}": f"{tag} layer {index} file {n}\n".encode() * (50 + n) for n in range(4)}
        blob, toc = crafted_layer(files)
        digest = upload_blob(registry, f"faults/{tag}", blob)
        chain.append(ChainLayer(f"{registry.host}/faults/{tag}:1", digest, sha256(toc)))
    return chain


def _no_partial_outputs(root: SnapshotRoot, chain: str, digest_hex: str, *, swept: bool) -> None:
    """Every output is absent or complete on disk; temps (hidden by the mount) only until a
    restart has swept them."""
    fs = root.fs(chain)
    cache = root.root / "cache"
    temps = [n for n in os.listdir(fs) if TEMP.match(n)] + [n for n in os.listdir(cache) if TEMP.match(n)]
    assert not (swept and temps), temps
    bootstrap = fs / digest_hex
    if bootstrap.exists():
        assert check_bootstrap(bootstrap.read_bytes()).ok
        assert (fs / layout.TOC_FILE).is_file()


def _kill_at(daemon, delay: float, target: Path) -> int:  # type: ignore[no-untyped-def]
    """stat `target` through the mount, kill -9 the daemon `delay` s later; the stat's errno."""
    outcome: list[int] = []

    def look() -> None:
        try:
            os.stat(target)
            outcome.append(0)
        except OSError as exc:
            outcome.append(exc.errno or -1)

    looker = threading.Thread(target=look)
    looker.start()
    time.sleep(delay)
    daemon.kill9()
    looker.join(timeout=60)
    assert outcome, "the stat never returned after the daemon died"
    return outcome[0]


def test_kill9_at_random_points_of_a_conversion_never_leaves_anything_partial(
    registry: RegistryProcess, snapdb, daemons, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    chain = _layers(registry, "kill-convert", 1)
    digest_hex = hex_of(chain[0].digest)
    reference = None
    for round_number in range(6):
        root = SnapshotRoot(tmp_path / f"root{round_number}", write_root(snapdb, tmp_path / f"root{round_number}",
                                                                           {"k": chain}))
        daemon = daemons(root.root)
        target = daemon.mountpoint / root.sid("k") / digest_hex
        _kill_at(daemon, rng.uniform(0.0, 0.6), target)
        _no_partial_outputs(root, "k", digest_hex, swept=False)
        again = daemons(root.root)
        _no_partial_outputs(root, "k", digest_hex, swept=True)  # the start-up sweep removed the temps
        assert not [n for n in os.listdir(again.mountpoint / root.sid("k")) if TEMP.match(n)]
        os.stat(again.mountpoint / root.sid("k") / digest_hex)
        built = (root.fs("k") / digest_hex).read_bytes()
        reference = reference or built
        assert built == reference  # a killed attempt never changes what the next one builds
        again.stop()
        time.sleep(0.3)  # a killed builder (PDEATHSIG) must not write anything late
        _no_partial_outputs(root, "k", digest_hex, swept=True)


def test_kill9_at_random_points_of_a_merge_never_leaves_anything_partial(
    containerd, registry: RegistryProcess, image_cache, snapdb, daemons, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    chain = image_chain(stacked_image(image_cache, containerd, registry, "gzip"))
    top = len(chain) - 1
    for round_number in range(4):
        path = tmp_path / f"root{round_number}"
        root = SnapshotRoot(path, write_root(snapdb, path, {"m": chain}))
        daemon = daemons(root.root)
        for index in range(top):  # the lower layers first, so the kill lands in the merge more often
            os.stat(daemon.mountpoint / root.sid("m", index) / hex_of(chain[index].digest))
        _kill_at(daemon, rng.uniform(0.0, 0.8), daemon.mountpoint / root.sid("m", top) / layout.IMAGE_BOOT)
        merged = root.fs("m", top) / layout.IMAGE_BOOT
        if merged.exists():  # (temps may be there now: the restarted daemon must sweep them)
            assert check_bootstrap(merged.read_bytes()).ok
        again = daemons(root.root)
        assert not [n for n in os.listdir(root.fs("m", top)) if TEMP.match(n)]
        os.stat(again.mountpoint / root.sid("m", top) / layout.IMAGE_BOOT)
        image_cli_ok("check", "--bootstrap", merged)
        again.stop()


def test_a_thousand_parallel_stats_over_sixteen_layers_convert_each_once(
    registry: RegistryProcess, snapdb, daemons, tmp_path: Path
) -> None:
    layers = _layers(registry, "storm", 16)
    chains = {f"s{index}": [layer] for index, layer in enumerate(layers)}
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root", chains))
    daemon = daemons(root.root, config={"max_builders": 4})
    targets = [daemon.mountpoint / root.sid(f"s{index}") / hex_of(layer.digest) for index, layer in enumerate(layers)]
    mark = registry.mark()
    with stat_storm(targets, 1000) as results:
        answered = [os.listdir(daemon.mountpoint) for _ in range(20)]  # the root keeps answering meanwhile
    assert all(isinstance(size, int) and size > 0 for size in results), [r for r in results if not isinstance(r, int)][:3]
    assert all(root.sid("s0") in listing for listing in answered)
    for index, layer in enumerate(layers):
        assert 1 <= len(registry.requests_for(layer.digest, since=mark)) <= 2, layer.digest
        assert check_bootstrap((root.fs(f"s{index}") / hex_of(layer.digest)).read_bytes()).ok
    log = daemon.log_text()
    for index in range(16):
        assert len(re.findall(rf"snapshot {root.sid(f's{index}')}: converted layer", log)) == 1
    assert "Traceback" not in log


# ------------------------------------------------------------------ a failing registry, through the mount
@pytest.mark.parametrize(
    ("fault", "outcome"),
    [
        ("503", errno.EIO), ("reset", errno.EIO), ("truncate", errno.EIO), ("stall", errno.EIO),
        ("drip:0.5", errno.EIO), ("bad-range", errno.EIO), ("trickle", 0), ("full200", 0), ("signed-redirect", 0),
    ],
)
def test_registry_faults_through_a_mount(
    fault: str, outcome: int, registry: RegistryProcess, fault_proxy_factory, snapdb, daemons, tmp_path: Path
) -> None:
    """The right errno within the deadline, the rest of the mount answering meanwhile, nothing
    partial left, one conversion per layer, and no signature or secret in the daemon's log."""
    layers = _layers(registry, f"fault-{fault.partition(':')[0]}", 2)
    proxy = fault_proxy_factory(registry.host)
    proxy.fault = f"{fault}:{registry.url}" if fault == "signed-redirect" else fault
    proxied = [ChainLayer(f"{proxy.host}/{layer.ref.split('/', 1)[1]}", layer.digest, layer.toc_digest) for layer in layers]
    root = SnapshotRoot(tmp_path / "root", write_root(snapdb, tmp_path / "root", {"f": proxied[:1], "ok": layers[1:]}))
    daemon = daemons(root.root, "--registry-timeout", "1", "--registry-retries", "0",
                     config={"retry_backoff": 0.2, "retry_backoff_max": 0.2})
    target = daemon.mountpoint / root.sid("f") / hex_of(layers[0].digest)
    result: list[int] = []
    looker = threading.Thread(target=lambda: result.append(_errno_of(target)))
    started = time.monotonic()
    looker.start()
    other = daemon.mountpoint / root.sid("ok") / hex_of(layers[1].digest)
    assert os.stat(other).st_size > 0  # another layer converts while the faulty one is pending
    looker.join(timeout=60)
    elapsed = time.monotonic() - started
    assert result == [outcome], (fault, result)
    assert elapsed < 20  # a generous bound on the deadline: timeout + bytes / min rate, no retries
    proxy.release.set()  # a stalled answer may go now
    log = daemon.log_text()
    assert SIGNATURE not in log and "X-Amz" not in log and "Traceback" not in log
    fs = root.fs("f")
    if outcome:
        assert hex_of(layers[0].digest) not in os.listdir(fs)
        recorded = json.loads((root.root / "stargzfs" / "state.json").read_text())["layers"][hex_of(layers[0].digest)]
        assert recorded["status"] == "error" and SIGNATURE not in recorded["error"]
        proxy.fault = "pass"  # the registry heals: after the backoff the same stat converts
        time.sleep(0.3)
        assert os.stat(target).st_size > 0
    assert len(re.findall(rf"snapshot {root.sid('f')}: converted layer", daemon.log_text())) == 1
    assert check_bootstrap((fs / hex_of(layers[0].digest)).read_bytes()).ok


def _errno_of(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or -1
    return 0

"""The conversion package through its provider seam, in process: no FUSE, everything else real.

A real loopback docker-registry serves ctr-remote eStargz images, metadata.db comes from
containerd's own storage code, the builder is the real `stargzfs-image` subprocess. What the
mount does on a stat/open is `provider.materialize(top, name)`; these tests call it directly,
so the glue's decisions (single flight, copies, refusals, backoff, state) run in seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from stargzfs.conversion import state
from stargzfs.conversion.provider import SnapshotRootProvider
from stargzfs.rafs.reader import read_bootstrap
from stargzfs.settings import MountSettings
from stargzfs.snapshots import layout
from support.crafted import crafted_layer, sha256
from support.images import PushedImage, build_image, upload_blob
from support.registry import RegistryProcess
from support.snapshot_root import ChainLayer, SnapshotRoot, hex_of, image_chain, write_root
from support.stacks import eight_layers, stacked_image


@pytest.fixture(scope="module")
def images(containerd, registry, image_cache) -> dict[str, PushedImage]:  # type: ignore[no-untyped-def]
    return {
        "gzip": stacked_image(image_cache, containerd, registry, "gzip"),
        "zstd": stacked_image(image_cache, containerd, registry, "zstd"),
        "plain": image_cache.get(
            ("test_pipeline_e2e", "plain"),
            lambda: build_image(containerd, registry, "pipeline-e2e/plain", eight_layers()[:1], compression="plain"),
        ),
    }


@pytest.fixture
def make_provider(snapdb, tmp_path: Path) -> Iterator[Callable[..., tuple[SnapshotRoot, SnapshotRootProvider]]]:  # type: ignore[no-untyped-def]
    made: list[SnapshotRootProvider] = []

    def make(chains: dict[str, list[ChainLayer]], **settings: object) -> tuple[SnapshotRoot, SnapshotRootProvider]:
        path = tmp_path / f"root{len(made)}"
        root = SnapshotRoot(path, write_root(snapdb, path, chains))
        provider = SnapshotRootProvider(MountSettings(root=root.root, mountpoint=tmp_path / "mnt", **settings))
        made.append(provider)
        return root, provider

    yield make
    for provider in made:
        provider.dirs.close()


async def test_layer_converts_once_with_two_requests_then_answers_from_disk(
    images, make_provider, registry: RegistryProcess
) -> None:
    image = images["gzip"]
    root, provider = make_provider({"gz": image_chain(image)[:1]})
    layer = image.layers[0]
    digest_hex = hex_of(layer.digest)
    mark = registry.mark()
    await provider.materialize(root.sid("gz"), digest_hex)
    fs = root.fs("gz")
    assert (fs / digest_hex).stat().st_mode & 0o777 == 0o440
    assert (fs / layout.TOC_FILE).is_file()
    assert (root.root / "cache" / layout.blob_meta_name(digest_hex)).is_file()
    assert [blob.blob_id for blob in read_bootstrap((fs / digest_hex).read_bytes()).blobs] == [digest_hex]
    assert 1 <= len(registry.requests_for(layer.digest, since=mark)) <= 2
    mark = registry.mark()
    await provider.materialize(root.sid("gz"), digest_hex)
    assert registry.requests_for(layer.digest, since=mark) == [] and provider.conversions == 1
    assert state.load_state(root.root)["layers"][digest_hex]["status"] == "converted"


async def test_concurrent_requests_for_one_digest_in_three_chains_fetch_and_build_once(
    images, make_provider, registry: RegistryProcess
) -> None:
    one = image_chain(images["zstd"])[1:2]
    root, provider = make_provider({"a": one, "b": one, "c": one})
    digest_hex = hex_of(one[0].digest)
    mark = registry.mark()
    async with trio.open_nursery() as nursery:
        for chain in "abc":
            for _ in range(4):
                nursery.start_soon(provider.materialize, root.sid(chain), digest_hex)
    assert provider.conversions == 1
    assert 1 <= len(registry.requests_for(one[0].digest, since=mark)) <= 2
    bootstraps = {(root.fs(chain) / digest_hex).read_bytes() for chain in "abc"}
    assert len(bootstraps) == 1  # the other snapshots got copies of the one build


async def test_image_boot_converts_the_chain_and_merges_it_base_first(images, make_provider) -> None:
    chain = image_chain(images["gzip"])
    root, provider = make_provider({"gz": chain})
    top = root.sid("gz", len(chain) - 1)
    assert provider.virtual_names(top) == (hex_of(chain[-1].digest), layout.IMAGE_BOOT)
    await provider.materialize(top, layout.IMAGE_BOOT)
    merged = read_bootstrap((root.fs("gz", len(chain) - 1) / layout.IMAGE_BOOT).read_bytes())
    with_data = []  # a layer of only dirs and whiteouts has no blob
    for index, layer in enumerate(chain):
        own = read_bootstrap((root.fs("gz", index) / hex_of(layer.digest)).read_bytes())
        with_data += [blob.blob_id for blob in own.blobs]
    assert [blob.blob_id for blob in merged.blobs] == with_data and len(with_data) == len(chain) - 1
    assert state.load_state(root.root)["images"][top]["status"] == "merged"


async def test_plain_layer_is_enoent_remembered_and_hides_its_names(
    images, make_provider, registry: RegistryProcess
) -> None:
    plain = image_chain(images["plain"])
    root, provider = make_provider({"p": plain})
    sid, digest_hex = root.sid("p"), hex_of(plain[0].digest)
    with pytest.raises(OSError) as first:
        await provider.materialize(sid, digest_hex)
    assert first.value.errno == errno.ENOENT and "not eStargz" in str(first.value)
    assert provider.virtual_names(sid) == ()
    mark = registry.mark()
    for name in (digest_hex, layout.IMAGE_BOOT):
        with pytest.raises(OSError) as again:
            await provider.materialize(sid, name)
        assert again.value.errno == errno.ENOENT
    assert registry.requests_for(plain[0].digest, since=mark) == []
    assert state.load_state(root.root)["layers"][digest_hex]["status"] == "not-estargz"


async def test_unreachable_registry_is_eio_then_backs_off(images, make_provider) -> None:
    layer = images["gzip"].layers[0]
    with socket.create_server(("127.0.0.1", 0)) as server:
        host = f"127.0.0.1:{server.getsockname()[1]}"
        server.setblocking(False)
        chain = [ChainLayer(f"{host}/nowhere/img:1", layer.digest, layer.toc_digest)]
        root, provider = make_provider(
            {"down": chain}, registry_timeout=0.3, registry_retries=0, retry_backoff=30.0
        )
        sid, digest_hex = root.sid("down"), hex_of(layer.digest)
        with pytest.raises(OSError) as first:
            await provider.materialize(sid, digest_hex)
        assert first.value.errno == errno.EIO and "no answer within 0.3s" in str(first.value)
        accepted = _drain(server)
        with pytest.raises(OSError) as second:
            await provider.materialize(sid, digest_hex)
        assert second.value.errno == errno.EIO
        assert accepted >= 1 and _drain(server) == 0  # backing off: no new connection
    recorded = state.load_state(root.root)["layers"][digest_hex]
    assert recorded["status"] == "error" and "no answer" in recorded["error"]


async def test_stale_temps_are_swept_only_in_candidate_dirs(images, make_provider, snapdb, tmp_path: Path) -> None:
    chain = image_chain(images["gzip"])[:1]
    root_dir = tmp_path / "root"
    write_root(snapdb, root_dir, {"gz": chain}, [{"op": "active", "key": "ctr", "parent": "sha256:gz-0", "labels": {}}])
    ids = {row["name"]: row["id"] for row in snapdb.list(root_dir / "metadata.db")}
    candidate_fs = layout.fs_dir(root_dir, ids["sha256:gz-0"])
    container_fs = layout.fs_dir(root_dir, ids["ctr"])
    for fs in (candidate_fs, container_fs):
        (fs / "converting-stargz1234").write_text("left by a kill")
        (fs / f".{hex_of(chain[0].digest)}.blob.meta.tmp-1-abcdef01").write_text("left by a kill")
    provider = SnapshotRootProvider(MountSettings(root=root_dir, mountpoint=tmp_path / "mnt"))
    try:
        assert sorted(os.listdir(candidate_fs)) == []
        assert len(os.listdir(container_fs)) == 2  # a container's writable layer is not ours
        assert provider.is_hidden(ids["sha256:gz-0"], "converting-stargz99")
        assert not provider.is_hidden(ids["ctr"], "converting-stargz99")
    finally:
        provider.dirs.close()


def _drain(server: socket.socket) -> int:
    """Accept (and close) every pending connection; how many there were."""
    count = 0
    while True:
        try:
            connection, _ = server.accept()
        except BlockingIOError:
            return count
        connection.close()
        count += 1


# ------------------------------------------------------------------ hostile registries, broken inputs
def _two_registries_one_digest(registry: RegistryProcess, registry_factory) -> tuple[str, str, str, bytes, bytes]:  # type: ignore[no-untyped-def]
    """(honest ref, hostile ref, digest, honest TOC, hostile TOC): both serve `digest`, with different TOCs.

    The hostile registry is a real docker-registry whose stored blob was swapped after upload
    (it never re-verifies what it serves), exactly what a compromised mirror can do.
    """
    honest_blob, honest_toc = crafted_layer({"etc/motd": b"honest\n" * 100})
    hostile_blob, hostile_toc = crafted_layer({"etc/motd": b"HOSTILE\n" * 100, "bin/evil": b"x" * 5000})
    digest = upload_blob(registry, "isolation/honest", honest_blob)
    hostile = registry_factory()
    assert upload_blob(hostile, "isolation/hostile", honest_blob) == digest
    hostile.blob_path(digest).write_bytes(hostile_blob)
    return (f"{registry.host}/isolation/honest:1", f"{hostile.host}/isolation/hostile:1", digest,
            honest_toc, hostile_toc)


@pytest.mark.parametrize("labels", [False, True], ids=["repository-keyed", "toc-label-keyed"])
@pytest.mark.parametrize("fs_driver", ["fusedev", "fscache"])
async def test_one_digest_two_tocs_never_share_outputs(
    make_provider, registry: RegistryProcess, registry_factory, labels: bool, fs_driver: str
) -> None:
    honest_ref, hostile_ref, digest, honest_toc, hostile_toc = _two_registries_one_digest(registry, registry_factory)
    honest = ChainLayer(honest_ref, digest, sha256(honest_toc) if labels else None)
    hostile = ChainLayer(hostile_ref, digest, sha256(hostile_toc) if labels else None)
    root, provider = make_provider({"honest": [honest], "hostile": [hostile]}, fs_driver=fs_driver)
    digest_hex = hex_of(digest)
    await provider.materialize(root.sid("honest"), digest_hex)
    honest_bootstrap = (root.fs("honest") / digest_hex).read_bytes()
    meta = (root.fs("honest") if fs_driver == "fscache" else root.root / "cache") / layout.blob_meta_name(digest_hex)
    honest_meta = meta.read_bytes()
    if fs_driver == "fusedev":
        # one blob.meta per digest in the shared cache dir: the second TOC may not replace it
        with pytest.raises(OSError) as refused:
            await provider.materialize(root.sid("hostile"), digest_hex)
        assert refused.value.errno == errno.EIO and "another TOC" in str(refused.value)
        assert not (root.fs("hostile") / digest_hex).exists()
    else:
        await provider.materialize(root.sid("hostile"), digest_hex)
        hostile_tree = read_bootstrap((root.fs("hostile") / digest_hex).read_bytes())
        assert hostile_tree.lookup("bin/evil") is not None  # its own TOC, not the honest one
        assert (root.fs("hostile") / layout.TOC_FILE).read_bytes() == hostile_toc
    assert provider.conversions == (2 if fs_driver == "fscache" else 1)
    # the honest image is exactly as it was, whatever the hostile one did
    assert (root.fs("honest") / digest_hex).read_bytes() == honest_bootstrap and meta.read_bytes() == honest_meta
    assert read_bootstrap(honest_bootstrap).lookup("bin/evil") is None


async def test_a_label_naming_another_tocs_digest_fails_verification_but_may_copy_the_matching_one(
    make_provider, registry: RegistryProcess, registry_factory
) -> None:
    honest_ref, hostile_ref, digest, honest_toc, _ = _two_registries_one_digest(registry, registry_factory)
    label = sha256(honest_toc)
    digest_hex = hex_of(digest)
    root, provider = make_provider({"liar": [ChainLayer(hostile_ref, digest, label)]})
    with pytest.raises(OSError) as mismatch:  # the hostile registry's TOC is not what the label says
        await provider.materialize(root.sid("liar"), digest_hex)
    assert mismatch.value.errno == errno.EIO and "TOC digest mismatch" in str(mismatch.value)
    assert os.listdir(root.fs("liar")) == []


async def test_an_existing_bootstrap_from_another_toc_is_caught_after_a_restart(
    make_provider, registry: RegistryProcess, registry_factory
) -> None:
    honest_ref, _, digest, honest_toc, hostile_toc = _two_registries_one_digest(registry, registry_factory)
    digest_hex = hex_of(digest)
    root, provider = make_provider({"honest": [ChainLayer(honest_ref, digest, sha256(honest_toc))]})
    # what an earlier, unchecked run could have left: outputs built from the other TOC
    (root.fs("honest") / layout.TOC_FILE).write_bytes(hostile_toc)
    (root.fs("honest") / digest_hex).write_bytes(b"\0" * 4096)
    with pytest.raises(OSError) as caught:
        await provider.materialize(root.sid("honest"), digest_hex)
    assert caught.value.errno == errno.EIO and f"was built from TOC {sha256(hostile_toc)}" in str(caught.value)


@pytest.mark.parametrize(
    ("case", "entry", "words"),
    [
        ("broken hardlink", {"name": "link", "type": "hardlink", "linkName": "missing"}, "does not exist"),
        ("60,000-level name", {"name": "a/" * 60_000 + "f", "type": "reg"}, "over PATH_MAX"),
    ],
)
async def test_a_malformed_toc_is_eio_remembered_and_never_fetched_again(
    make_provider, registry: RegistryProcess, case: str, entry: dict, words: str
) -> None:
    blob, _ = crafted_layer(extra_entries=[entry])
    digest = upload_blob(registry, "broken/toc", blob)
    root, provider = make_provider({"bad": [ChainLayer(f"{registry.host}/broken/toc:1", digest)]},
                                   retry_backoff=0.01, retry_backoff_max=0.01)
    sid, digest_hex = root.sid("bad"), hex_of(digest)
    mark = registry.mark()
    for _ in range(3):
        with pytest.raises(OSError) as failed:
            await provider.materialize(sid, digest_hex)
        assert failed.value.errno == errno.EIO and "malformed eStargz layer" in str(failed.value)
        await trio.sleep(0.05)  # well past the backoff: a retry would fetch again
    assert len(registry.requests_for(digest, since=mark)) == 1
    assert provider.virtual_names(sid) == (digest_hex, layout.IMAGE_BOOT)  # offered: stat says why
    recorded = state.load_state(root.root)["layers"][digest_hex]
    assert recorded["status"] == "error" and words in recorded["error"]
    assert os.listdir(root.fs("bad")) == []


async def test_any_unexpected_failure_is_eio_recorded_and_backed_off(
    images, make_provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: a bug in our own code (simulated) must not escape or refetch per lookup."""
    import stargzfs.conversion.layer as layer_module

    calls = 0

    async def broken(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        raise RecursionError("maximum recursion depth exceeded (simulated)")

    monkeypatch.setattr(layer_module, "fetch_toc", broken)
    chain = image_chain(images["gzip"])[:1]
    root, provider = make_provider({"gz": chain}, retry_backoff=30.0)
    sid, digest_hex = root.sid("gz"), hex_of(chain[0].digest)
    for _ in range(3):
        with pytest.raises(OSError) as failed:
            await provider.materialize(sid, digest_hex)
        assert failed.value.errno == errno.EIO and "unexpected RecursionError" in str(failed.value)
    assert calls == 1
    assert "unexpected RecursionError" in state.load_state(root.root)["layers"][digest_hex]["error"]


async def test_the_builder_runs_under_the_memory_limit(make_provider, registry: RegistryProcess) -> None:
    """A TOC that needs more memory than the builder may use fails its own conversion only."""
    many = [{"name": f"d/f{index:06d}", "type": "reg", "mode": 0o644} for index in range(300_000)]
    blob, _ = crafted_layer(extra_entries=many)
    digest = upload_blob(registry, "limits/big", blob)
    chain = [ChainLayer(f"{registry.host}/limits/big:1", digest)]
    root, provider = make_provider({"big": chain}, builder_memory_mib=64, builder_cpu_seconds=120)
    wrapped = provider.layers.builder.wrap(["stargzfs-image", "create"])
    assert f"--as={64 << 20}" in wrapped and "--cpu=120" in wrapped and wrapped[-2:] == ["stargzfs-image", "create"]
    with pytest.raises(OSError) as failed:
        await provider.materialize(root.sid("big"), hex_of(digest))
    assert failed.value.errno == errno.EIO and "out of memory" in str(failed.value)
    roomy_root, roomy = make_provider({"big": chain})
    await roomy.materialize(roomy_root.sid("big"), hex_of(digest))  # the default limit is enough


async def test_the_builder_server_is_restarted_when_it_dies(images, make_provider) -> None:
    """A killed warm builder costs the conversion in flight at most; the next one starts a new server."""
    chain = image_chain(images["gzip"])[:2]
    root, provider = make_provider({"gz": chain})
    server = provider.layers.builder.server
    assert server is not None
    await provider.materialize(root.sid("gz", 0), hex_of(chain[0].digest))
    first = server._process
    assert first is not None and first.poll() is None
    first.kill()
    first.wait()
    await provider.materialize(root.sid("gz", 1), hex_of(chain[1].digest))
    assert server._process is not first and server._process.poll() is None
    assert (root.fs("gz", 1) / hex_of(chain[1].digest)).is_file()


async def test_the_conversion_leaves_the_blob_index_and_keeps_one_already_there(images, make_provider) -> None:
    """The bundled builder writes lazy serving's index during the conversion (no second
    builder run at the blob's first open); an index already in the cache dir is never
    replaced: opening the blob checks it against blob.meta and rebuilds it with its cache."""
    from stargzfs.rafs import blobindex

    a, b = image_chain(images["gzip"])[:1], image_chain(images["zstd"])[:1]  # base layers hold data
    root, provider = make_provider({"a": a, "b": b})
    first, second = hex_of(a[0].digest), hex_of(b[0].digest)
    cache = root.root / "cache"
    planted = cache / layout.blob_index_name(second)
    planted.write_bytes(b"not an index")
    await provider.materialize(root.sid("a"), first)
    index = (cache / layout.blob_index_name(first)).read_bytes()
    meta = (cache / layout.blob_meta_name(first)).read_bytes()
    assert blobindex.decode(index, meta).chunk_count > 0
    await provider.materialize(root.sid("b"), second)
    assert planted.read_bytes() == b"not an index"
    assert not [name for name in os.listdir(cache) if layout.is_temp_name(name)]


async def test_warm_up_returns_once_the_builder_server_has_imported_the_builder(
    images, make_provider, tmp_path: Path
) -> None:
    """`stargzfs mount` reports ready after the provider's warm_up: by then the fork server
    has finished its imports (it signals that; a start-up delay before its interpreter even
    starts is waited for too) and the registry client is open."""
    from stargzfs.conversion.forkserver import ForkServer

    root, provider = make_provider({"gz": image_chain(images["gzip"])[:1]})
    mark = tmp_path / "server-started"
    server = ForkServer(["sh", "-c", f'sleep 0.3; : > {mark}; exec "$@"', "sh"])
    provider.layers.builder = dataclasses.replace(provider.layers.builder, server=server)
    await provider.warm_up()
    assert mark.exists() and server._process is not None and server._process.poll() is None
    assert provider._client is not None
    code, output = await server.run(["--version"], [], memory_limit=0, cpu_limit=0)
    assert code == 0 and b"stargzfs-image" in output
    server._process.kill()
    server._process.wait()


async def test_a_fork_server_job_whose_output_cannot_be_written_fails(tmp_path: Path) -> None:
    """A job ends as the console script does: output it cannot write (here its reader has
    gone, so EPIPE, at a write or at the final flush) is a failed job (141, as SIGPIPE),
    never a silent 0."""
    import array
    import json

    from stargzfs.conversion.forkserver import ForkServer

    toc = tmp_path / "toc.json"
    toc.write_text(json.dumps({"version": 1, "entries": [{"name": "d", "type": "dir", "mode": 0o755}]}))
    boot = tmp_path / "boot"
    server = ForkServer(["env", "-u", "PYTHONUNBUFFERED"])  # buffered, so the failure comes at the final flush
    try:
        code, output = await server.run(
            ["create", "--source-type", "stargz_index", "--bootstrap", str(boot), "--blob-id", "ab" * 32,
             "--repeatable", "--fs-version", "6", str(toc)], [], memory_limit=0, cpu_limit=0)
        assert code == 0, output
        connection = await server._connection()
        read_fd, write_fd = os.pipe()
        os.close(read_fd)  # nobody will read what the job prints
        job = {"id": 1000, "argv": ["inspect", str(boot), "ls", "/"], "targets": [], "as": 0, "cpu": 0}
        try:
            await connection.sendmsg(
                [json.dumps(job).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_fd]))]
            )
        finally:
            os.close(write_fd)
        assert await server._status(1000) == 141
        code, output = await server.run(["inspect", str(boot), "ls", "/"], [], memory_limit=0, cpu_limit=0)
        assert code == 0 and b"d" in output.split()
    finally:
        assert server._process is not None
        server._process.kill()
        server._process.wait()

"""The test infrastructure itself: real registry, private containerd, real eStargz images."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import httpx
import pytest
import zstandard

from stargzfs.estargz.toc import parse_toc
from support.images import (
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    TOC_DIGEST_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
    Containerd,
    CtrError,
    FileSpec,
    ImageCache,
    PushedImage,
    build_image,
    make_layer_tar,
)
from support.registry import RegistryProcess, make_htpasswd, parse_access_log

BASE_LAYER = [
    FileSpec("", "dir"),
    FileSpec("etc", "dir"),
    FileSpec("etc/hello.txt", data=b"hello eStargz\n", xattrs={"user.test": b"xattr-value"}),
    FileSpec("etc/empty"),
    FileSpec("bin", "dir"),
    FileSpec("bin/tool", data=bytes(range(256)) * 64, mode=0o4755, uid=1000, gid=1000),
]
UPPER_LAYER = [
    FileSpec("etc", "dir"),
    FileSpec("etc/link", "hardlink", target="etc/target"),  # hardlink before its target
    FileSpec("etc/target", data=b"target\n", xattrs={"user.bin": b"\xff\x00\x80"}),
    FileSpec("etc/sym", "symlink", target="../bin/tool"),
    FileSpec("bin", "opaque"),
    FileSpec("etc/empty", "whiteout"),
    FileSpec("big", data=hashlib.sha256(b"seed").digest() * 8192),  # 256 KiB
]
SKIPPABLE_FRAME_40 = b"\x50\x2a\x4d\x18\x28\x00\x00\x00"


def two_layer_image(
    image_cache: ImageCache, containerd: Containerd, registry: RegistryProcess, compression: str
) -> PushedImage:
    return image_cache.get(
        ("support-test", compression),
        lambda: build_image(
            containerd, registry, f"support-test/two-layer:{compression}",
            [BASE_LAYER, UPPER_LAYER], compression=compression, chunk_size=65536,
        ),
    )


def gzip_toc_bytes(blob: bytes) -> bytes:
    """Footer -> TOC member -> stargz.index.json bytes, the way a lazy reader does it."""
    footer = blob[-51:]
    toc_offset = int(footer[16:32], 16)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    member = inflater.decompress(blob[toc_offset:-51])
    assert inflater.eof and inflater.unused_data == b""
    with tarfile.open(fileobj=io.BytesIO(member)) as archive:
        info = archive.next()
        assert info is not None and info.name == "stargz.index.json"
        handle = archive.extractfile(info)
        assert handle is not None
        return handle.read()


def test_gzip_two_layer_image_is_real_estargz(image_cache, containerd, registry) -> None:
    image = two_layer_image(image_cache, containerd, registry, "gzip")
    assert image.ref == f"{registry.host}/support-test/two-layer:gzip"
    assert len(image.layers) == 2 and len(image.config["rootfs"]["diff_ids"]) == 2
    for layer in image.layers:
        blob = layer.blob()
        assert layer.media_type == OCI_LAYER_GZIP
        assert hashlib.sha256(blob).hexdigest() == layer.digest.split(":")[1]
        assert len(blob) == layer.size
        # Footer bytes exactly as in estargz.md §A2.
        footer = blob[-51:]
        assert footer[:16] == b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x1a\x00SG\x16\x00"
        assert footer[32:] == b"STARGZ\x01\x00\x00\xff\xff" + b"\x00" * 8
        toc_raw = gzip_toc_bytes(blob)
        assert layer.annotations[TOC_DIGEST_ANNOTATION] == layer.toc_digest
        assert layer.toc_digest == "sha256:" + hashlib.sha256(toc_raw).hexdigest()
        # The diffID covers the whole decompressed stream, TOC included.
        assert layer.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()

    base_toc = parse_toc(gzip_toc_bytes(image.layers[0].blob()))
    assert base_toc.by_name["etc/hello.txt"].xattrs == {"user.test": b"xattr-value"}
    assert base_toc.by_name["bin/tool"].mode == 0o4755
    assert base_toc.by_name["bin/tool"].uid == 1000
    upper_raw_bytes = gzip_toc_bytes(image.layers[1].blob())
    upper_toc = parse_toc(upper_raw_bytes)
    assert upper_toc.by_name["etc/target"].xattrs == {"user.bin": b"\xff\x00\x80"}
    assert upper_toc.by_name["etc/link"].type == "hardlink"
    assert upper_toc.by_name["etc/sym"].link_name == "../bin/tool"
    upper_raw = json.loads(upper_raw_bytes)
    names = [entry["name"] for entry in upper_raw["entries"]]
    assert names[0] == ".no.prefetch.landmark"
    assert names.index("./etc/link") < names.index("./etc/target")
    assert {"./bin/.wh..wh..opq", "./etc/.wh.empty"} <= set(names)
    assert sum(entry["type"] == "chunk" for entry in upper_raw["entries"]) == 3  # 256 KiB / 64 KiB


def test_zstd_image_has_skippable_frame_footer(image_cache, containerd, registry) -> None:
    image = two_layer_image(image_cache, containerd, registry, "zstd")
    for layer in image.layers:
        blob = layer.blob()
        assert layer.media_type == OCI_LAYER_ZSTD
        assert blob[-48:-40] == SKIPPABLE_FRAME_40
        toc_offset, compressed, uncompressed, kind = struct.unpack("<4Q", blob[-40:-8])
        assert blob[-8:] == b"GnUlInUx" and kind == 1
        assert layer.annotations[ZSTD_MANIFEST_POSITION_ANNOTATION] == (
            f"{toc_offset}:{compressed}:{uncompressed}:1"
        )
        assert blob[toc_offset - 8 : toc_offset - 4] == b"\x50\x2a\x4d\x18"
        toc_frame = blob[toc_offset : toc_offset + compressed]
        assert layer.annotations[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] == (
            "sha256:" + hashlib.sha256(toc_frame).hexdigest()
        )
        toc_raw = zstandard.ZstdDecompressor().decompressobj().decompress(toc_frame)
        assert len(toc_raw) == uncompressed
        assert layer.toc_digest == "sha256:" + hashlib.sha256(toc_raw).hexdigest()


def test_plain_image_is_not_estargz(containerd, registry) -> None:
    image = build_image(containerd, registry, "support-test/plain", [BASE_LAYER], compression="plain")
    assert image.tag == "latest"
    [layer] = image.layers
    assert layer.toc_digest is None and layer.annotations == {}
    blob = layer.blob()
    assert b"STARGZ" not in blob[-51:]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as archive:
        assert "stargz.index.json" not in archive.getnames()
        assert "./etc/hello.txt" in archive.getnames()


def test_access_log_records_blob_requests(image_cache, containerd, registry) -> None:
    layer = two_layer_image(image_cache, containerd, registry, "gzip").layers[0]
    since = registry.mark()
    with httpx.Client() as client:
        tail = client.get(layer.url, headers={"Range": "bytes=-51"})
        head = client.head(layer.url)
        whole = client.get(layer.url)
    assert tail.status_code == 206 and tail.content == layer.blob()[-51:]
    assert head.status_code == 200 and whole.status_code == 200
    records = registry.requests_for(layer.digest, since=since)
    assert [(r.method, r.status) for r in records] == [("GET", 206), ("HEAD", 200), ("GET", 200)]
    assert records[0].bytes == 51 and records[2].bytes == layer.size
    assert records[0].path == f"/v2/{layer.repository}/blobs/{layer.digest}"
    assert registry.requests_for(layer.digest, since=registry.mark()) == []
    # Only this blob: the other layer's digest saw nothing in the window.
    other = two_layer_image(image_cache, containerd, registry, "gzip").layers[1]
    assert registry.requests_for(other.digest, since=since) == []


def test_parse_access_log_skips_garbage() -> None:
    text = (
        '127.0.0.1 - - [29/Nov/2026:14:49:44 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"\n'
        "not an access line\n"
        '127.0.0.1 - - [29/Nov/2026:14:49:44 +0000] "HEAD /v2/r/blobs/sha256:ab?x=1 HTTP/1.1" 404 - "" ""\n'
        '127.0.0.1 - - [29/Nov/2026:14:49:44 +0000] "GET /v2/partial'
    )
    records = parse_access_log(text)
    assert [(r.method, r.path, r.status, r.bytes, r.query) for r in records] == [
        ("GET", "/v2/", 200, 2, ""),
        ("HEAD", "/v2/r/blobs/sha256:ab", 404, 0, "x=1"),
    ]


def test_htpasswd_registry_requires_credentials(registry_factory, tmp_path: Path) -> None:
    password = "s3cret-pw"
    secured = registry_factory(htpasswd=make_htpasswd(tmp_path / "htpasswd", "alice", password))
    assert httpx.get(f"{secured.url}/v2/").status_code == 401
    assert "stargzfs-test" in httpx.get(f"{secured.url}/v2/").headers["www-authenticate"]
    assert httpx.get(f"{secured.url}/v2/", auth=("alice", "wrong")).status_code == 401
    assert httpx.get(f"{secured.url}/v2/", auth=("alice", password)).status_code == 200
    assert password not in repr(secured)
    assert password not in secured.config_path.read_text()


def test_missing_htpasswd_file_is_refused(tmp_path: Path) -> None:
    """distribution would invent a random 'docker' user instead of failing."""
    process = RegistryProcess(tmp_path / "reg", htpasswd=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="absent"):
        process.start()
    assert not process.running and not (tmp_path / "absent").exists()


def test_seeded_registry_serves_cached_image_behind_auth(
    image_cache, containerd, registry, registry_factory, tmp_path: Path
) -> None:
    image = two_layer_image(image_cache, containerd, registry, "gzip")
    htpasswd = make_htpasswd(tmp_path / "htpasswd", "bob", "pw")
    secured = registry_factory(htpasswd=htpasswd, seed_from=registry)
    manifest_url = f"{secured.url}/v2/{image.repository}/manifests/{image.tag}"
    accept = {"Accept": image.manifest["mediaType"]}
    assert httpx.get(manifest_url, headers=accept).status_code == 401
    response = httpx.get(manifest_url, headers=accept, auth=("bob", "pw"))
    assert response.status_code == 200 and response.json() == image.manifest


def test_token_auth_registry_challenges_with_bearer(registry_factory, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=stargzfs-test-token", "-days", "1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    secured = registry_factory(token_auth={
        "realm": "http://127.0.0.1:9/token", "service": "stargzfs-registry",
        "issuer": "stargzfs-test", "rootcertbundle": str(cert),
    })
    response = httpx.get(f"{secured.url}/v2/")
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'realm="http://127.0.0.1:9/token"' in challenge and 'service="stargzfs-registry"' in challenge


def test_stop_start_keeps_port_and_data(registry_factory, containerd) -> None:
    own = registry_factory()
    image = build_image(containerd, own, "support-test/restart:v1", [BASE_LAYER])
    host, digest = own.host, image.layers[0].digest
    own.stop()
    assert not own.running
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{own.url}/v2/", timeout=2.0)
    own.start()
    own.start()  # idempotent
    assert own.host == host
    since = own.mark()
    response = httpx.get(image.layers[0].url)
    assert response.status_code == 200 and response.content == image.layers[0].blob()
    assert [(r.method, r.status) for r in own.requests_for(digest, since=since)] == [("GET", 200)]


def test_image_cache_builds_each_key_once() -> None:
    cache = ImageCache()
    calls: list[int] = []
    sentinel = object()

    def builder():
        calls.append(1)
        return sentinel

    assert cache.get("k", builder) is sentinel
    assert cache.get("k", builder) is sentinel
    assert calls == [1] and "k" in cache


def test_make_layer_tar_names_order_and_metadata(tmp_path: Path) -> None:
    out = make_layer_tar(
        [
            FileSpec("", "dir", mode=0o700),
            FileSpec("a/hl", "hardlink", target="a/t"),
            FileSpec("a/t", data=b"x", xattrs={"user.bin": b"\xff\x00\x80"}),
            FileSpec("dev/null", "char", major=1, minor=3),
            FileSpec("dev/sda", "block", major=8, minor=0),
            FileSpec("p", "fifo"),
            FileSpec("a/gone", "whiteout"),
            FileSpec("a", "opaque"),
            FileSpec("/abs", raw=True, data=b"abs"),
        ],
        tmp_path / "layer.tar",
    )
    with tarfile.open(out) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == [
        ".", "./a/hl", "./a/t", "./dev/null", "./dev/sda", "./p", "./a/.wh.gone",
        "./a/.wh..wh..opq", "/abs",
    ]
    assert members[0].isdir() and members[0].mode == 0o700
    assert members[1].islnk() and members[1].linkname == "./a/t"
    assert members[2].pax_headers["SCHILY.xattr.user.bin"].encode("utf-8", "surrogateescape") == (
        b"\xff\x00\x80"
    )
    assert members[3].ischr() and (members[3].devmajor, members[3].devminor) == (1, 3)
    assert members[4].isblk() and members[5].isfifo()
    assert members[6].isreg() and members[6].size == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_inputs_are_rejected(containerd, registry, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression"):
        build_image(containerd, registry, "support-test/bad", [BASE_LAYER], compression="lz4")
    with pytest.raises(ValueError, match="lowercase"):
        build_image(containerd, registry, "Support/Bad", [BASE_LAYER])
    with pytest.raises(ValueError, match="unknown FileSpec kind"):
        make_layer_tar([FileSpec("x", "socket")], tmp_path / "bad.tar")
    assert not (tmp_path / "bad.tar").exists()
    with pytest.raises(CtrError, match="no-such-image"):
        containerd.ctr("images", "push", "--plain-http", f"{registry.host}/no-such-image:x")


def test_builds_are_reproducible_and_accept_tar_paths(containerd, registry, tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "hello.txt").write_bytes(b"from GNU tar\n")
    gnu_tar = tmp_path / "gnu.tar"
    subprocess.run(
        ["tar", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@1600000000", "--sort=name",
         "-C", str(rootfs), "-cf", str(gnu_tar), "."],
        check=True,
    )
    gzipped = tmp_path / "spec.tar.gz"
    gzipped.write_bytes(gzip.compress(make_layer_tar(UPPER_LAYER, tmp_path / "spec.tar").read_bytes()))

    first = build_image(containerd, registry, "support-test/repro-a", [gnu_tar, gzipped])
    second = build_image(containerd, registry, "support-test/repro-b", [gnu_tar, gzipped])
    assert [layer.digest for layer in first.layers] == [layer.digest for layer in second.layers]
    gnu_names = {entry.name for entry in parse_toc(gzip_toc_bytes(first.layers[0].blob())).entries}
    assert "etc/hello.txt" in gnu_names
    upper_names = {entry.name for entry in parse_toc(gzip_toc_bytes(first.layers[1].blob())).entries}
    assert "etc/target" in upper_names


def test_identical_layers_in_one_image(containerd, registry) -> None:
    """ctr-remote 0.12 fails on duplicate layers by itself; build_image converts each once."""
    image = build_image(
        containerd, registry, "support-test/dup:zstd", [BASE_LAYER, UPPER_LAYER, BASE_LAYER],
        compression="zstd",
    )
    digests = [layer.digest for layer in image.layers]
    assert len(digests) == 3 and digests[0] == digests[2] != digests[1]
    diff_ids = image.config["rootfs"]["diff_ids"]
    assert len(diff_ids) == 3 and diff_ids[0] == diff_ids[2] != diff_ids[1]
    served = httpx.get(image.manifest_url, headers={"Accept": image.manifest["mediaType"]})
    assert served.json() == image.manifest
    assert "sha256:" + hashlib.sha256(served.content).hexdigest() == image.manifest_digest
    config_blob = registry.blob_path(image.manifest["config"]["digest"]).read_bytes()
    assert json.loads(config_blob) == image.config

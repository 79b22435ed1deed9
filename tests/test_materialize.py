"""`stargzfs-image materialize`: real blobs (nydus fixtures, ctr-remote via a real registry) → blob cache.

blob.meta files here come from `encode_blob_meta` over the TOC's chunks in v2.1 order
(independent of the builder), so these tests pin materialize alone; test_rafs_kernel.py
runs the whole create → materialize → mount chain.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from stargzfs.estargz.toc import Toc, parse_toc
from stargzfs.image_cli import main as image_main
from stargzfs.rafs.blobmeta import ChunkMeta, decode_blob_meta, encode_blob_meta
from support.images import FileSpec, build_image
from support.paths import NYDUS_FIXTURES

LOWER_BLOB = NYDUS_FIXTURES / "blobs" / "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
LOWER_TOC = NYDUS_FIXTURES / "stargz.index-lower.json"


def chunks_in_v2_1_order(toc: Toc) -> list[ChunkMeta]:
    """One ChunkMeta per TOC data record, uncompressed offsets advanced by 4 KiB-rounded sizes."""
    chunks: list[ChunkMeta] = []
    next_offset = 0
    for entry in toc.entries:
        for chunk in entry.chunks:
            chunks.append(ChunkMeta(next_offset, chunk.size, chunk.offset, 0))
            next_offset += (chunk.size + 4095) // 4096 * 4096
    return chunks


def expected_content(toc: Toc, blob: bytes, compression: str) -> dict[int, bytes]:
    """Independent decoding (stdlib gzip / zstandard) of each chunk: uncompressed offset → bytes."""
    out: dict[int, bytes] = {}
    for meta, (entry, chunk) in zip(
        chunks_in_v2_1_order(toc), [(e, c) for e in toc.entries for c in e.chunks]
    ):
        if compression == "gzip":
            data = gzip.GzipFile(fileobj=__import__("io").BytesIO(blob[chunk.offset :])).read(chunk.size)
        else:
            reader = zstandard.ZstdDecompressor().stream_reader(blob[chunk.offset :], read_across_frames=False)
            data = reader.read(chunk.size)
            while len(data) < chunk.size:
                data += reader.read(chunk.size - len(data))
        out[meta.uncompressed_offset] = data
    return out


def run_materialize(*args: str | Path) -> int:
    return image_main(["materialize", *map(str, args)])


def assert_nothing_written(directory: Path, keep: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == keep


@pytest.fixture
def lower(tmp_path: Path) -> tuple[Toc, Path]:
    toc = parse_toc(LOWER_TOC.read_bytes())
    meta = tmp_path / "lower.blob.meta"
    meta.write_bytes(encode_blob_meta(chunks_in_v2_1_order(toc)))
    return toc, meta


def test_fixture_blob_to_cache_file(lower: tuple[Toc, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toc, meta = lower
    dev = tmp_path / "lower.dev"
    assert run_materialize("--blob-meta", meta, "--blob", LOWER_BLOB, "-o", dev, "--toc", LOWER_TOC) == 0
    data = dev.read_bytes()
    _, chunks = decode_blob_meta(meta.read_bytes())
    end = max(c.uncompressed_offset + c.uncompressed_size for c in chunks)
    assert len(data) == (end + 4095) // 4096 * 4096 and len(data) % 4096 == 0
    for offset, content in expected_content(toc, LOWER_BLOB.read_bytes(), "gzip").items():
        assert data[offset : offset + len(content)] == content
    # whole files equal their TOC digests (the fixture TOC has no chunkDigest)
    for entry in toc.entries:
        if entry.type == "reg" and entry.chunks:
            meta_by_coff = {c.compressed_offset: c for c in chunks}
            content = b"".join(
                data[meta_by_coff[c.offset].uncompressed_offset :][: c.size] for c in entry.chunks
            )
            assert "sha256:" + hashlib.sha256(content).hexdigest() == entry.digest
    assert "16 chunks (8 verified)" in capsys.readouterr().out
    assert_nothing_written(tmp_path, {"lower.blob.meta", "lower.dev"})
    assert dev.stat().st_mode & 0o777 == 0o600  # the layer's data, uncompressed: private by default
    shared = tmp_path / "shared.dev"
    assert run_materialize("--blob-meta", meta, "--blob", LOWER_BLOB, "-o", shared, "--mode", "0644") == 0
    assert shared.stat().st_mode & 0o777 == 0o644 and shared.read_bytes() == data


def test_duplicate_hardlink_entries_and_detection(lower: tuple[Toc, Path], tmp_path: Path) -> None:
    """v2.1 lists hardlinked chunks twice; no --toc, no --compressor: gzip is detected."""
    toc, _ = lower
    chunks = chunks_in_v2_1_order(toc)
    doubled = sorted(chunks + chunks[:4], key=lambda c: c.uncompressed_offset)
    meta = tmp_path / "dup.blob.meta"
    meta.write_bytes(encode_blob_meta(doubled))
    dev = tmp_path / "dup.dev"
    assert run_materialize("--blob-meta", meta, "--blob", LOWER_BLOB, "-o", dev) == 0
    reference = tmp_path / "ref.dev"
    good_meta = tmp_path / "good.blob.meta"
    good_meta.write_bytes(encode_blob_meta(chunks))
    assert run_materialize("--blob-meta", good_meta, "--blob", LOWER_BLOB, "-o", reference, "--compressor", "gzip") == 0
    assert dev.read_bytes() == reference.read_bytes()


def test_zstd_frames(tmp_path: Path) -> None:
    """A zstd blob of one frame per chunk (two members' worth of trailing data each)."""
    payloads = [b"alpha" * 1000, bytes(range(256)) * 64, b"z"]
    blob = bytearray(b"\0" * 7)
    chunks: list[ChunkMeta] = []
    for index, payload in enumerate(payloads):
        frame = zstandard.ZstdCompressor().compress(payload + b"trailing tar padding" * 3)
        chunks.append(ChunkMeta(index * 16384, len(payload), len(blob), 0))
        blob += frame
    blob_path, meta, dev = tmp_path / "blob", tmp_path / "meta", tmp_path / "dev"
    blob_path.write_bytes(bytes(blob))
    meta.write_bytes(encode_blob_meta(chunks))
    assert run_materialize("--blob-meta", meta, "--blob", blob_path, "-o", dev) == 0
    data = dev.read_bytes()
    assert len(data) == 32768 + 4096
    for chunk, payload in zip(chunks, payloads):
        assert data[chunk.uncompressed_offset :][: len(payload)] == payload
    # the explicit but wrong compressor is a clear format error
    assert run_materialize("--blob-meta", meta, "--blob", blob_path, "-o", tmp_path / "dev2", "--compressor", "gzip") == 5


def test_no_chunks_gives_empty_file(tmp_path: Path) -> None:
    meta, dev = tmp_path / "meta", tmp_path / "dev"
    meta.write_bytes(encode_blob_meta([]))
    assert run_materialize("--blob-meta", meta, "--blob", LOWER_BLOB, "-o", dev) == 0
    assert dev.stat().st_size == 0


@pytest.mark.parametrize(
    "corruption, exit_code, message",
    [
        ("bad-meta", 5, "blob.meta: bad magic"),
        ("short-meta", 5, "blob.meta: size"),
        ("short-blob", 5, "gzip data is truncated"),
        ("offset-past-blob", 5, "beyond the end"),
        ("chunk-digest", 7, "the TOC says sha256:"),
        ("toc-mismatch", 5, "no TOC chunk starts at compressed offset"),
        ("missing-blob", 2, "is not a readable file"),
    ],
)
def test_errors_leave_no_output(
    corruption: str, exit_code: int, message: str, lower: tuple[Toc, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    toc, meta = lower
    blob = tmp_path / "blob"
    blob.write_bytes(LOWER_BLOB.read_bytes())
    toc_path = tmp_path / "toc.json"
    toc_path.write_bytes(LOWER_TOC.read_bytes())
    extra: list[str | Path] = []
    if corruption == "bad-meta":
        meta.write_bytes(b"\0" * 8192)
    elif corruption == "short-meta":
        meta.write_bytes(meta.read_bytes()[:-100])
    elif corruption == "short-blob":
        meta.write_bytes(encode_blob_meta([ChunkMeta(0, 12, 13802, 0)]))  # root-1's member
        blob.write_bytes(LOWER_BLOB.read_bytes()[:13815])  # ends 13 bytes into it
    elif corruption == "offset-past-blob":
        meta.write_bytes(encode_blob_meta([ChunkMeta(0, 10, 40000, 0)]))
    elif corruption in ("chunk-digest", "toc-mismatch"):
        doc = json.loads(LOWER_TOC.read_bytes())
        for record in doc["entries"]:
            if record["name"] == "root-1":
                if corruption == "chunk-digest":
                    record["chunkDigest"] = "sha256:" + "ab" * 32
                else:
                    record["offset"] += 1
        toc_path.write_text(json.dumps(doc))
        extra = ["--toc", toc_path]
    elif corruption == "missing-blob":
        blob.unlink()
    before = {p.name for p in tmp_path.iterdir()}
    dev = tmp_path / "out.dev"
    assert run_materialize("--blob-meta", meta, "--blob", blob, "-o", dev, *extra) == exit_code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert_nothing_written(tmp_path, before)


@pytest.fixture(scope="module")
def small_image(containerd, registry, image_cache):  # type: ignore[no-untyped-def]
    files = [
        FileSpec("etc", kind="dir"),
        FileSpec("etc/hello", data=b"hello world\n"),
        FileSpec("big", data=bytes(range(256)) * 20000),  # 5 MB → 2 chunks at 4 MiB
        FileSpec("empty"),
    ]
    return image_cache.get(
        ("test_materialize", "small"), lambda: build_image(containerd, registry, "materialize/small", [files])
    )


def layer_inputs(layer, tmp_path: Path) -> tuple[Path, Path, Path]:  # type: ignore[no-untyped-def]
    """(blob file, TOC file, blob.meta) of a pushed layer, read from the registry's disk."""
    from stargzfs.estargz.fetch import read_toc_file

    blob_file = tmp_path / "blob"
    blob_file.write_bytes(layer.blob())
    toc = read_toc_file(blob_file).toc
    toc_path = tmp_path / "toc.json"
    toc_path.write_bytes(toc.raw)
    meta = tmp_path / "meta"
    meta.write_bytes(encode_blob_meta(chunks_in_v2_1_order(toc)))
    return blob_file, toc_path, meta


def test_registry_url_source_few_requests(small_image, registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """URL source through the registry client: chunkDigests verified, one range request."""
    layer = small_image.layers[0]
    blob_file, toc_path, meta = layer_inputs(layer, tmp_path)
    from_url, from_file = tmp_path / "url.dev", tmp_path / "file.dev"
    mark = registry.mark()
    assert run_materialize("--blob-meta", meta, "--blob", layer.url, "-o", from_url, "--toc", toc_path) == 0
    gets = [r for r in registry.requests_for(layer.digest, since=mark) if r.method == "GET" and r.status < 300]
    assert 1 <= len(gets) <= 2
    assert run_materialize("--blob-meta", meta, "--blob", blob_file, "-o", from_file) == 0
    assert from_url.read_bytes() == from_file.read_bytes()
    content = from_file.read_bytes()
    assert content.count(b"hello world\n") == 1
    from_ref = tmp_path / "ref.dev"
    ref_at_digest = f"{registry.host}/{layer.repository}@{layer.digest}"
    assert run_materialize("--blob-meta", meta, "--blob", ref_at_digest, "-o", from_ref, "--toc", toc_path) == 0
    assert from_ref.read_bytes() == content


@pytest.mark.parametrize(
    "blob, message",
    [
        ("https://user:hunter2@registry.example/v2/a/b/blobs/sha256:" + "0" * 64, "must not carry credentials"),
        ("https://registry.example/v2/a/b/manifests/latest", "must look like https://HOST/v2/REPO/blobs/"),
    ],
)
def test_bad_urls(blob: str, message: str, lower: tuple[Toc, Path], tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    _, meta = lower
    assert run_materialize("--blob-meta", meta, "--blob", blob, "-o", tmp_path / "dev") == 2
    err = capsys.readouterr().err
    assert message in err and "hunter2" not in err
    assert not (tmp_path / "dev").exists()


@pytest.fixture
def silent_registry() -> Iterator[str]:
    """host:port of a socket that accepts connections (kernel backlog) but never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_registry_timeout_and_retries_flags(
    silent_registry: str, lower: tuple[Toc, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, meta = lower
    url = f"http://{silent_registry}/v2/some/repo/blobs/sha256:{'0' * 64}"
    dev = tmp_path / "dev"
    argv = ["--blob-meta", meta, "--blob", url, "-o", dev, "--registry-timeout", "0.3", "--registry-retries", "1"]
    assert run_materialize(*argv) == 4
    err = capsys.readouterr().err
    assert "no answer within 0.3s" in err and "gave up after 2 attempts" in err and err.count("\n") == 1
    assert not dev.exists() and {p.name for p in tmp_path.iterdir()} == {"lower.blob.meta"}


@pytest.mark.parametrize("flag, value", [("--registry-timeout", "0"), ("--registry-timeout", "x"),
                                         ("--registry-retries", "-1"), ("--mode", "0999"), ("--mode", "01000")])
def test_bad_registry_flags_exit_2(flag: str, value: str, lower: tuple[Toc, Path], tmp_path: Path) -> None:
    _, meta = lower
    with pytest.raises(SystemExit) as exited:
        run_materialize("--blob-meta", meta, "--blob", LOWER_BLOB, "-o", tmp_path / "dev", flag, value)
    assert exited.value.code == 2


def _materialize_with_stderr_on(argv: list[str], terminal: bool) -> tuple[int, str]:
    """Run the console script with stderr on a pseudo-terminal (or a pipe); (exit code, stderr)."""
    import os
    import pty
    import subprocess

    from support.paths import VENV_BIN

    if not terminal:
        done = subprocess.run([str(VENV_BIN / "stargzfs-image"), *argv], capture_output=True, text=True, timeout=120)
        return done.returncode, done.stderr
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen([str(VENV_BIN / "stargzfs-image"), *argv], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        output = b""
        while True:
            try:
                piece = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not piece:
                break
            output += piece
        return process.wait(timeout=120), output.decode("utf-8", "replace")
    finally:
        os.close(master)


def test_progress_bar_only_on_a_terminal(small_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    layer = small_image.layers[0]
    _, toc_path, meta = layer_inputs(layer, tmp_path)
    argv = ["materialize", "--blob-meta", str(meta), "--blob", layer.url, "--toc", str(toc_path)]
    code, shown = _materialize_with_stderr_on([*argv, "-o", str(tmp_path / "tty.dev")], terminal=True)
    assert code == 0
    final = shown.replace("\r\n", "\n").split("\r")[-1].strip()
    assert re.fullmatch(r"\[#{30}\] (\d+\.\d) (KiB|MiB) / \1 \2 100%", final), shown
    assert _materialize_with_stderr_on([*argv, "-o", str(tmp_path / "q.dev"), "--quiet"], terminal=True) == (0, "")
    assert _materialize_with_stderr_on([*argv, "-o", str(tmp_path / "pipe.dev")], terminal=False) == (0, "")
    assert (tmp_path / "tty.dev").read_bytes() == (tmp_path / "pipe.dev").read_bytes()

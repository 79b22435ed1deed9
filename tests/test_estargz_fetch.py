"""fetch_toc / read_chunk on nydus's real stargz blobs and on blobs crafted byte by byte.

The crafted blobs follow the eStargz layout (estargz.md §A1/§A6): every payload starts
a new gzip member / zstd frame, the TOC sits in its own member before the footer. The
real-registry variants (ctr-remote images, access-log request counts) are in
tests/test_cli_toc.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import zlib
from pathlib import Path

import pytest
import trio
import zstandard

from stargzfs.errors import FormatError, NotEstargzError, UnsupportedError, UsageError, VerificationError
from stargzfs.estargz.codecs import codec_named
from stargzfs.estargz.decompress import inflate_prefix, read_chunk
from stargzfs.estargz.fetch import FileRangeReader, fetch_toc, read_toc_file
from stargzfs.estargz.gzip_codec import GZIP, toc_tar
from stargzfs.estargz.gzip_codec import encode_footer as encode_gzip_footer
from stargzfs.estargz.zstd_codec import encode_footer as encode_zstd_footer
from stargzfs.estargz.toc import Chunk
from support.paths import NYDUS_FIXTURES

LOWER_BLOB = NYDUS_FIXTURES / "blobs" / "e81a6dbddf425e3082f158ff1d80f2adab1dde8dad0b8c4ca43c1bad339f4ec5"
MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# A minimal eStargz writer (enough for detection/TOC tests, not a converter)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _compress(compression: str, data: bytes) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    return zstandard.ZstdCompressor().compress(data)


def make_blob(
    files: dict[str, bytes],
    compression: str = "gzip",
    *,
    legacy: bool = False,
    toc_json: bytes | None = None,
    toc_member: bytes | None = None,
) -> tuple[bytes, bytes]:
    """(blob, TOC JSON) for `files` (name → content); overrides craft broken TOCs."""
    segments: list[bytes] = []
    records: list[dict] = [{"name": "./", "type": "dir", "mode": 0o755}]
    current = io.BytesIO()
    starts: list[str] = []
    for name, data in files.items():
        header = tarfile.TarInfo(f"./{name}")
        header.size = len(data)
        current.write(header.tobuf(format=tarfile.USTAR_FORMAT))
        record = {"name": f"./{name}", "type": "reg", "mode": 0o644, "size": len(data), "digest": _sha(data)}
        if data:
            segments.append(current.getvalue())
            current = io.BytesIO()
            current.write(data + b"\0" * (-len(data) % 512))
            starts.append(name)
            record["chunkDigest"] = _sha(data)
        records.append(record)
    segments.append(current.getvalue())
    blob = bytearray()
    offsets: dict[str, int] = {}
    for index, segment in enumerate(segments):
        if index:
            offsets[starts[index - 1]] = len(blob)
        blob += _compress(compression, segment)
    for record in records:
        name = record["name"][2:]
        if name in offsets:
            record["offset"] = offsets[name]
    if toc_json is None:
        toc_json = json.dumps({"version": 1, "entries": records}, indent="\t").encode()
    if compression == "gzip":
        toc_offset = len(blob)
        blob += toc_member if toc_member is not None else _compress("gzip", toc_tar(toc_json))
        blob += encode_gzip_footer(toc_offset, legacy=legacy)
    else:
        frame = toc_member if toc_member is not None else _compress("zstd", toc_json)
        blob += b"\x50\x2a\x4d\x18" + len(frame).to_bytes(4, "little")
        toc_offset = len(blob)
        blob += frame + encode_zstd_footer(toc_offset, len(frame), len(toc_json))
    return bytes(blob), toc_json


FILES = {"etc/hello.txt": b"hello world\n", "empty": b"", "bin/tool": bytes(range(256)) * 64}


@pytest.fixture(params=["gzip", "zstd"])
def compression(request: pytest.FixtureRequest) -> str:
    return request.param


def write(tmp_path: Path, blob: bytes) -> Path:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    return path


# ---------------------------------------------------------------------------------------------
# nydus v2.1.6 fixture blobs (legacy 47-byte footer, produced by upstream's own tooling)


def independent_toc(blob: bytes, toc_offset: int) -> bytes:
    """stargz.index.json extracted with stdlib zlib + tarfile, the way estargz.md §B6 does."""
    member = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob[toc_offset:])
    with tarfile.open(fileobj=io.BytesIO(member)) as archive:
        extracted = archive.extractfile("stargz.index.json")
        assert extracted is not None
        return extracted.read()


def test_fixture_blob_toc_equals_the_toc_inside_the_blob() -> None:
    result = read_toc_file(LOWER_BLOB)
    blob = LOWER_BLOB.read_bytes()
    assert result.footer.kind == "legacy"
    assert result.raw == independent_toc(blob, 0x731F)
    assert len(result.raw) == 5392
    assert result.toc.digest == _sha(result.raw)
    assert result.toc.get("lower/root-large") is not None
    assert (result.requests, result.bytes_fetched) == (1, len(blob))  # the blob is smaller than the window


def test_fixture_blob_with_a_small_window_costs_exactly_two_requests() -> None:
    result = read_toc_file(LOWER_BLOB, tail_size=64)
    assert result.requests == 2
    assert result.bytes_fetched == 64 + (len(LOWER_BLOB.read_bytes()) - 47 - 0x731F)
    assert result.raw == read_toc_file(LOWER_BLOB).raw


def test_fixture_chunks_reassemble_to_nydus_expected_md5() -> None:
    """lower.result (nydus's expected tree) lists md5 a832eab6… for root-large, 1fc133b5… for root-1."""
    blob = LOWER_BLOB.read_bytes()
    result = read_toc_file(LOWER_BLOB)
    all_chunks = sorted((c for e in result.toc.entries for c in e.chunks), key=lambda c: c.offset)
    next_offset = {
        chunk.offset: (all_chunks[i + 1].offset if i + 1 < len(all_chunks) else result.footer.payload_end)
        for i, chunk in enumerate(all_chunks)
    }

    def content(name: str) -> bytes:
        entry = result.toc.get(name)
        assert entry is not None
        return b"".join(read_chunk(blob, c, next_offset[c.offset], GZIP) for c in entry.chunks)

    large = content("lower/root-large")
    assert len(result.toc.get("lower/root-large").chunks) == 4
    assert hashlib.md5(large).hexdigest() == "a832eab60623f115363cc100a8862c23"
    assert hashlib.md5(content("lower/root-1")).hexdigest() == "1fc133b570f60d1a13f2c97e179a7e8b"


# ---------------------------------------------------------------------------------------------
# crafted blobs: both compressions, all footers


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_gzip_blob(tmp_path: Path, legacy: bool) -> None:
    blob, toc_json = make_blob(FILES, legacy=legacy)
    result = read_toc_file(write(tmp_path, blob), expected_digest=_sha(toc_json))
    assert result.footer.kind == ("legacy" if legacy else "estargz")
    assert result.raw == toc_json
    assert [e.name for e in result.toc.entries] == ["", "etc/hello.txt", "empty", "bin/tool"]
    assert result.requests == 1


def test_crafted_blob_chunks(tmp_path: Path, compression: str) -> None:
    blob, toc_json = make_blob(FILES, compression)
    result = read_toc_file(write(tmp_path, blob), expected_digest=_sha(toc_json))
    assert result.footer.compression == compression
    assert result.raw == toc_json
    tool = result.toc.get("bin/tool")
    hello = result.toc.get("etc/hello.txt")
    assert tool is not None and hello is not None
    assert read_chunk(blob, hello.chunks[0], tool.chunks[0].offset, codec_named(compression)) == FILES["etc/hello.txt"]
    assert read_chunk(blob, tool.chunks[0], result.footer.payload_end, codec_named(compression)) == FILES["bin/tool"]


async def test_fetch_toc_counts_requests_and_bytes_for_a_toc_outside_the_window(
    tmp_path: Path, compression: str
) -> None:
    files = {f"f{i:05d}": b"" for i in range(3000)}  # a TOC member of tens of KiB
    blob, toc_json = make_blob(files, compression)
    reader = FileRangeReader(write(tmp_path, blob))
    result = await fetch_toc(reader, tail_size=4096)
    assert result.raw == toc_json
    assert result.requests == reader.requests == 2
    extra_header = 8 if compression == "zstd" else 0
    assert result.bytes_fetched == reader.bytes_read == 4096 + result.footer.toc_compressed_size + extra_header
    assert result.footer.toc_compressed_size > 4096


async def test_fetch_toc_reads_once_when_the_toc_fits_the_window(tmp_path: Path, compression: str) -> None:
    blob, _ = make_blob(FILES, compression)
    padded = FileRangeReader(write(tmp_path, blob))
    result = await fetch_toc(padded, tail_size=len(blob) - 100)  # window starts inside the payload
    assert result.requests == padded.requests == 1


def test_digest_mismatch_is_a_verification_error(tmp_path: Path, compression: str) -> None:
    blob, _ = make_blob(FILES, compression)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(VerificationError, match=f"label says {wrong}"):
        read_toc_file(write(tmp_path, blob), expected_digest=wrong)


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 32, "0" * 64])
def test_malformed_expected_digest_is_a_usage_error(tmp_path: Path, digest: str) -> None:
    blob, _ = make_blob(FILES)
    with pytest.raises(UsageError, match="sha256:<64 hex>"):
        read_toc_file(write(tmp_path, blob), expected_digest=digest)


def test_plain_gzip_layer_is_not_estargz(tmp_path: Path) -> None:
    path = write(tmp_path, gzip.compress(toc_tar(b"plain layer content" * 100), mtime=0))
    with pytest.raises(NotEstargzError):
        read_toc_file(path)


@pytest.mark.parametrize("size", [0, 1, 46])
def test_tiny_blobs_are_not_estargz(tmp_path: Path, size: int) -> None:
    with pytest.raises(NotEstargzError, match=f"only {size} bytes"):
        read_toc_file(write(tmp_path, b"\x1f" * size))


def test_tail_window_smaller_than_a_footer_is_refused(tmp_path: Path) -> None:
    blob, _ = make_blob(FILES)
    with pytest.raises(UsageError, match="below the 51-byte footer"):
        read_toc_file(write(tmp_path, blob), tail_size=50)


def test_first_entry_not_the_toc_is_rejected(tmp_path: Path) -> None:
    json_bytes = b'{"version": 1, "entries": []}'
    member = gzip.compress(toc_tar(json_bytes, name="etc/passwd"), mtime=0)
    blob, _ = make_blob(FILES, toc_member=member)
    with pytest.raises(FormatError, match="starts with tar entry 'etc/passwd', not stargz.index.json"):
        read_toc_file(write(tmp_path, blob))


def test_toc_member_that_is_not_a_tar_is_rejected(tmp_path: Path) -> None:
    blob, _ = make_blob(FILES, toc_member=gzip.compress(b"{}" * 400, mtime=0))
    with pytest.raises(FormatError, match="is not a tar stream"):
        read_toc_file(write(tmp_path, blob))


def test_corrupt_toc_member_is_a_format_error(tmp_path: Path) -> None:
    blob, _ = make_blob(FILES, toc_member=b"\x1f\x8b\x08\x00" + b"\xff" * 200)
    with pytest.raises(FormatError, match="TOC gzip member at offset .*: gzip data is corrupt"):
        read_toc_file(write(tmp_path, blob))


@pytest.mark.parametrize("toc_json", [b"{not json", b'{"version": 2, "entries": []}', b"[]"])
def test_invalid_toc_json_is_a_format_error(tmp_path: Path, compression: str, toc_json: bytes) -> None:
    blob, _ = make_blob(FILES, compression, toc_json=toc_json)
    with pytest.raises(FormatError, match="TOC"):
        read_toc_file(write(tmp_path, blob))


def test_digest_is_checked_before_json_parsing(tmp_path: Path) -> None:
    blob, _ = make_blob(FILES, toc_json=b"{not json")
    with pytest.raises(VerificationError):
        read_toc_file(write(tmp_path, blob), expected_digest="sha256:" + "1" * 64)


def test_parse_false_verifies_without_parsing(tmp_path: Path, compression: str) -> None:
    """The daemon's mode: footer, TOC bytes and digest are checked; the JSON is left to the
    builder subprocess, so even a TOC it will refuse comes back verbatim."""
    blob, toc_json = make_blob(FILES, compression, toc_json=b'{"version": 2, "entries": "not parsed here"}')
    path = write(tmp_path, blob)
    result = read_toc_file(path, expected_digest=_sha(toc_json), parse=False)
    assert result.toc is None and result.raw == toc_json and result.requests == 1
    with pytest.raises(VerificationError):
        read_toc_file(path, expected_digest="sha256:" + "1" * 64, parse=False)
    with pytest.raises(FormatError, match="TOC version must be 1"):
        read_toc_file(path, expected_digest=_sha(toc_json))


def test_gzip_toc_over_the_cap_fails_from_the_tar_header(tmp_path: Path) -> None:
    """A tar header claiming 1 TiB of JSON is refused before any of it is decoded."""
    header = tarfile.TarInfo("stargz.index.json")
    header.size = 1 << 40
    member = gzip.compress(header.tobuf(format=tarfile.GNU_FORMAT) + b"{" * 4096, mtime=0)
    blob, _ = make_blob(FILES, toc_member=member)
    with pytest.raises(FormatError, match=r"TOC is 1099511627776 bytes uncompressed \(tar header\), over"):
        read_toc_file(write(tmp_path, blob))


def test_gzip_zip_bomb_toc_is_capped(tmp_path: Path) -> None:
    """Real 8 MiB JSON (compresses to a few KiB) against a 1 MiB cap."""
    json_bytes = b'{"version": 1, "entries": [' + b" " * (8 * MiB) + b"]}"
    blob, _ = make_blob(FILES, toc_json=json_bytes)
    assert len(blob) < 64 * 1024
    with pytest.raises(FormatError, match="over the 1048576-byte limit"):
        read_toc_file(write(tmp_path, blob), max_toc_size=MiB)
    assert read_toc_file(write(tmp_path, blob), max_toc_size=16 * MiB).raw == json_bytes


def test_zstd_frame_expanding_past_its_declared_size_is_capped(tmp_path: Path) -> None:
    """Footer says 100 bytes; the frame holds 64 MiB: decoding stops at the declared size."""
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b" " * (64 * MiB))
    blob, _ = make_blob(FILES, "zstd", toc_member=bomb)
    blob = blob[:-48] + encode_zstd_footer(int.from_bytes(blob[-40:-32], "little"), len(bomb), 100)
    with pytest.raises(FormatError, match="past the 100-byte limit"):
        read_toc_file(write(tmp_path, blob))


async def test_zstd_declared_size_over_the_cap_fails_after_one_request(tmp_path: Path) -> None:
    files = {f"f{i:05d}": b"" for i in range(3000)}
    blob, toc_json = make_blob(files, "zstd")
    reader = FileRangeReader(write(tmp_path, blob))
    with pytest.raises(FormatError, match=f"TOC is {len(toc_json)} bytes uncompressed .zstd footer., over"):
        await fetch_toc(reader, tail_size=1024, max_toc_size=len(toc_json) - 1)
    assert reader.requests == 1


async def test_compressed_toc_over_the_cap_fails_after_one_request(tmp_path: Path) -> None:
    files = {f"f{i:05d}": b"" for i in range(3000)}
    blob, _ = make_blob(files)
    reader = FileRangeReader(write(tmp_path, blob))
    with pytest.raises(FormatError, match="compressed TOC is .* over the 2000-byte limit"):
        await fetch_toc(reader, tail_size=1024, max_toc_size=2000)
    assert reader.requests == 1


def test_zstd_toc_without_its_skippable_frame_header_is_rejected(tmp_path: Path) -> None:
    blob, _ = make_blob(FILES, "zstd")
    toc_offset = int.from_bytes(blob[-40:-32], "little")
    broken = blob[: toc_offset - 8] + b"\0" * 8 + blob[toc_offset:]
    with pytest.raises(FormatError, match="not wrapped in a skippable frame"):
        read_toc_file(write(tmp_path, broken))


def test_zstd_frame_shorter_than_declared_is_rejected(tmp_path: Path) -> None:
    blob, toc_json = make_blob(FILES, "zstd")
    blob = blob[:-48] + encode_zstd_footer(int.from_bytes(blob[-40:-32], "little"),
                                           int.from_bytes(blob[-32:-24], "little"), len(toc_json) + 5)
    with pytest.raises(FormatError, match="the footer says"):
        read_toc_file(write(tmp_path, blob))


async def test_toc_offset_past_the_blob_makes_no_range_request(tmp_path: Path) -> None:
    blob, _ = make_blob(FILES)
    reader = FileRangeReader(write(tmp_path, blob[:-51] + encode_gzip_footer(10**12)))
    with pytest.raises(FormatError, match="outside the blob"):
        await fetch_toc(reader)
    assert reader.requests == 1


def test_external_toc_blob_is_unsupported(tmp_path: Path) -> None:
    extra = b"SG\x11\x00STARGZEXTERNALTOC"
    footer = bytes.fromhex("1f8b08040000000000ff1500") + extra + bytes.fromhex("010000ffff") + b"\0" * 8
    with pytest.raises(UnsupportedError):
        read_toc_file(write(tmp_path, gzip.compress(b"x" * 100) + footer))


def test_read_chunk_honours_inner_offset() -> None:
    """estargz >= 0.13 puts several small payloads in one member (shared offset, innerOffset)."""
    member = gzip.compress(b"HEADER--" + b"first" + b"second", mtime=0)
    blob = b"\0" * 10 + member + gzip.compress(b"next member", mtime=0)
    chunk = Chunk(offset=10, chunk_offset=0, size=6, digest=None, inner_offset=13)
    assert read_chunk(blob, chunk, 10 + len(member), GZIP) == b"second"


def test_read_chunk_spanning_members() -> None:
    blob = gzip.compress(b"abc", mtime=0) + gzip.compress(b"def", mtime=0)
    chunk = Chunk(offset=0, chunk_offset=0, size=5, digest=None, inner_offset=1)
    assert read_chunk(blob, chunk, len(blob), GZIP) == b"bcdef"


@pytest.mark.parametrize(("next_offset", "message"), [(10**9, "outside the"), (5, "outside the")])
def test_read_chunk_rejects_bad_ranges(next_offset: int, message: str) -> None:
    blob = gzip.compress(b"abc", mtime=0)
    chunk = Chunk(offset=5, chunk_offset=0, size=3, digest=None)
    with pytest.raises(FormatError, match=message):
        read_chunk(blob, chunk, next_offset, GZIP)


def test_read_chunk_shorter_than_the_toc_says() -> None:
    blob = gzip.compress(b"abc", mtime=0)
    chunk = Chunk(offset=0, chunk_offset=0, size=10, digest=None)
    with pytest.raises(FormatError, match="decodes to 3 bytes, needs 10"):
        read_chunk(blob, chunk, len(blob), GZIP)


async def test_file_range_reader_refuses_ranges_past_the_end(tmp_path: Path) -> None:
    reader = FileRangeReader(write(tmp_path, b"0123456789"))
    assert await reader.read_range(2, 5) == b"234"
    assert await reader.read_tail(4) == (b"6789", 10)
    assert await reader.read_tail(100) == (b"0123456789", 10)
    with pytest.raises(FormatError, match="outside the 10-byte blob"):
        await reader.read_range(5, 11)


async def test_offload_runs_decoding_in_a_worker_thread(tmp_path: Path) -> None:
    blob, toc_json = make_blob(FILES)
    threads: list[threading.Thread] = []

    async def offload(work):
        def tracked():
            threads.append(threading.current_thread())
            return work()

        return await trio.to_thread.run_sync(tracked)

    result = await fetch_toc(FileRangeReader(write(tmp_path, blob)), offload=offload)
    assert result.raw == toc_json
    assert threads and threads[0] is not threading.main_thread()


def test_inflate_prefix_is_the_shared_chunk_decoder() -> None:
    """What rafs.materialize uses for blob.meta chunks: a prefix of one member, trailing data ignored."""
    member = gzip.compress(b"payload" + b"tar padding and the next header", mtime=0)
    assert inflate_prefix(member + b"garbage after", 7, GZIP) == b"payload"
    assert inflate_prefix(member, 3, GZIP, skip=4) == b"oad"
    with pytest.raises(FormatError, match="gzip data decodes to 38 bytes, needs 50"):
        inflate_prefix(member, 50, GZIP)


def test_gzip_member_with_fextra_header_is_accepted() -> None:
    """The TOC member of old stargz blobs carries FEXTRA (`stargz.toc`)."""
    body = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = body.compress(b"toc bytes") + body.flush()
    extra = b"stargz.toc"
    header = bytes.fromhex("1f8b08040000000000ff") + len(extra).to_bytes(2, "little") + extra
    trailer = zlib.crc32(b"toc bytes").to_bytes(4, "little") + (9).to_bytes(4, "little")
    assert GZIP.first_member(header + deflated + trailer, limit=100) == b"toc bytes"

"""One conformance suite run against every eStargz codec (gzip and zstd).

Each codec writes a layer (members, TOC, footer) and must read it back: footer detection,
TOC extraction, size-capped decoding (the zip-bomb defence), chunk decoding and the builder
flag. Codec-specific byte layouts have their own tests (test_estargz_footer.py).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from stargzfs.conversion.builder import Builder
from stargzfs.errors import FormatError, NotEstargzError
from stargzfs.estargz.codec import Codec
from stargzfs.estargz.codecs import CODECS, codec_for_data, codec_named
from stargzfs.estargz.decompress import inflate_prefix, read_chunk
from stargzfs.estargz.fetch import read_toc_file
from stargzfs.estargz.footer import MAX_FOOTER_SIZE, parse_footer
from stargzfs.estargz.toc import Chunk

MiB = 1024 * 1024


@pytest.fixture(params=CODECS, ids=lambda codec: codec.name)
def codec(request: pytest.FixtureRequest) -> Codec:
    return request.param


def _bomb(compress_chunk: Callable[[bytes], bytes], finish: Callable[[], bytes], total: int) -> bytes:
    """A member of `total` spaces, compressed incrementally (never all in memory)."""
    block = b" " * MiB
    return b"".join(compress_chunk(block) for _ in range(total // MiB)) + finish()


def _gzip_bomb(total: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return _bomb(compressor.compress, compressor.flush, total)


def _zstd_bomb(total: int) -> bytes:
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=False).compressobj()
    return _bomb(compressor.compress, compressor.flush, total)


#: how each codec's bomb is made, and how far past the limit one decoding step may run
BOMBS = {"gzip": (_gzip_bomb, 1 * MiB), "zstd": (_zstd_bomb, 8 * MiB)}


def layer(codec: Codec, files: list[bytes], *, legacy: bool = False) -> tuple[bytes, bytes, list[int]]:
    """(blob, TOC JSON, member offsets): one member per file, then the codec's TOC and footer."""
    blob = bytearray()
    offsets = []
    for data in files:
        offsets.append(len(blob))
        blob += codec.compress(data)
    toc = json.dumps({"version": 1, "entries": [
        {"name": f"f{i}", "type": "reg", "size": len(data), "offset": offsets[i]} for i, data in enumerate(files)
    ]}).encode()
    blob += codec.encode_toc_and_footer(toc, len(blob), legacy=legacy)
    return bytes(blob), toc, offsets


# ------------------------------------------------------------------ layout: footer and TOC
@pytest.mark.parametrize("legacy", [False, True], ids=["current", "legacy"])
def test_written_layer_reads_back(codec: Codec, legacy: bool, tmp_path: Path) -> None:
    files = [b"hello\n" * 100, bytes(range(256)) * 50]
    blob, toc, offsets = layer(codec, files, legacy=legacy)
    footer = parse_footer(blob[-MAX_FOOTER_SIZE:], len(blob))
    assert footer.compression == codec.name and footer.size in codec.footer_sizes
    assert footer.payload_end == len(codec.compress(files[0])) + len(codec.compress(files[1]))
    path = tmp_path / "blob"
    path.write_bytes(blob)
    result = read_toc_file(path)
    assert result.raw == toc and result.codec is codec
    assert [entry.chunks[0].offset for entry in result.toc.entries] == offsets
    assert result.requests == 1  # a small TOC comes with the footer


def test_toc_beyond_the_tail_window_costs_one_more_request(codec: Codec, tmp_path: Path) -> None:
    blob, toc, _ = layer(codec, [bytes(range(256)) * 4000])
    path = tmp_path / "blob"
    path.write_bytes(blob)
    result = read_toc_file(path, tail_size=MAX_FOOTER_SIZE)
    assert (result.raw, result.requests) == (toc, 2)


def test_toc_over_the_cap_is_refused(codec: Codec, tmp_path: Path) -> None:
    blob, toc, _ = layer(codec, [b"x" * 10])
    path = tmp_path / "blob"
    path.write_bytes(blob)
    with pytest.raises(FormatError, match="limit"):
        read_toc_file(path, max_toc_size=len(toc) - 1)


def test_damaged_toc_member_is_a_format_error(codec: Codec, tmp_path: Path) -> None:
    blob, toc, _ = layer(codec, [b"x" * 10])
    footer = parse_footer(blob[-MAX_FOOTER_SIZE:], len(blob))
    damaged = bytearray(blob)
    middle = (footer.toc_offset + footer.toc_end) // 2
    damaged[middle - 4 : middle + 4] = b"\xff" * 8
    path = tmp_path / "blob"
    path.write_bytes(bytes(damaged))
    with pytest.raises(FormatError):
        read_toc_file(path)


def test_members_without_a_footer_are_a_plain_layer(codec: Codec) -> None:
    blob = codec.compress(b"a plain layer" * 100)
    with pytest.raises(NotEstargzError):
        parse_footer(blob[-MAX_FOOTER_SIZE:], len(blob))


def test_codec_is_found_by_name_and_by_its_bytes(codec: Codec) -> None:
    assert codec_named(codec.name) is codec
    assert codec_for_data(codec.compress(b"data")) is codec


def test_unknown_codec_names_the_value() -> None:
    with pytest.raises(FormatError, match="'lz4'"):
        codec_named("lz4")
    with pytest.raises(FormatError, match="neither"):
        codec_for_data(b"\x04\x22\x4d\x18")


def test_builder_flag(codec: Codec) -> None:
    bundled = Builder(("stargzfs-image",), "stargzfs", "bundled")
    external = Builder(("nydus-image",), "v2.1", "v2.1.6")
    argv = bundled.create_argv(bootstrap="B", blob_id="h", blob_meta="M", toc="T", codec=codec, blob_data_size=1)
    assert argv[-1] == "T" and argv[-1 - len(codec.builder_args()) : -1] == codec.builder_args()
    assert bundled.converts(codec)
    # nydus-image v2.1 reads gzip eStargz only: it needs no flag, and no other codec
    assert external.converts(codec) == (codec.builder_args() == [])


# ------------------------------------------------------------------ decoding
def test_first_member_stops_at_the_member_boundary(codec: Codec) -> None:
    data = codec.compress(b"first member") + codec.compress(b"second member")
    assert codec.first_member(data, limit=1000) == b"first member"


def test_multi_member_stream_continues_across_members(codec: Codec) -> None:
    data = codec.compress(b"abc" * 1000) + codec.compress(b"") + codec.compress(b"def" * 1000)
    stream = codec.open_stream(data, multi_member=True)
    assert stream.read(2999) == b"abc" * 999 + b"ab"
    assert stream.read(4) == b"cdef"
    assert stream.read() == b"def" * 999
    assert stream.read() == b""


def test_exact_limit_is_allowed_one_byte_more_is_not(codec: Codec) -> None:
    data = codec.compress(b"j" * 4096)
    assert len(codec.first_member(data, limit=4096)) == 4096
    with pytest.raises(FormatError, match="past the 4095-byte limit"):
        codec.first_member(data, limit=4095)


def test_bomb_fails_after_decoding_at_most_limit_plus_one_step(codec: Codec) -> None:
    make_bomb, step = BOMBS[codec.name]
    data = make_bomb(64 * MiB)
    assert len(data) < MiB // 8  # a tiny download that would expand to 64 MiB
    stream = codec.open_stream(data, limit=4 * MiB)
    with pytest.raises(FormatError, match="past the 4194304-byte limit"):
        stream.read()
    assert 4 * MiB < stream.produced <= 4 * MiB + step


def test_truncated_member_is_a_format_error(codec: Codec) -> None:
    data = codec.compress(bytes(range(256)) * 400)
    with pytest.raises(FormatError, match="truncated"):
        codec.first_member(data[: len(data) // 2], limit=MiB)


def test_empty_input_is_truncated(codec: Codec) -> None:
    with pytest.raises(FormatError, match="truncated"):
        codec.first_member(b"", limit=MiB)


def test_garbage_is_a_format_error(codec: Codec) -> None:
    with pytest.raises(FormatError, match=f"{codec.name} data is corrupt"):
        codec.first_member(b"this is not compressed at all" * 10, limit=MiB)


def test_chunk_decoding_skips_and_spans_members(codec: Codec) -> None:
    blob = codec.compress(b"first") + codec.compress(b"second") + codec.compress(b"third")
    start = len(codec.compress(b"first"))
    assert inflate_prefix(blob[start:], 6, codec) == b"second"
    assert inflate_prefix(blob, 4, codec, skip=3, multi_member=True) == b"stse"
    chunk = Chunk(offset=start, chunk_offset=0, size=8, digest=None, inner_offset=2)
    assert read_chunk(blob, chunk, len(blob), codec) == b"condthir"
    with pytest.raises(FormatError, match="needs 50"):
        inflate_prefix(blob[start:], 50, codec)

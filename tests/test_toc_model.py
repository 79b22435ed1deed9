"""The TOC model's normalisation rules (estargz.md §A3/§A8) on nydus's fixtures and crafted TOCs."""

from __future__ import annotations

import base64
import json

import pytest

from stargzfs.errors import FormatError
from stargzfs.estargz.toc import clean_name, parse_rfc3339, parse_toc
from support.paths import NYDUS_FIXTURES


def toc_bytes(entries: list[dict]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}, indent="\t").encode()


@pytest.mark.parametrize(
    "raw, clean",
    [("./", ""), ("/", ""), ("./etc/", "etc"), ("/abs/file", "abs/file"), ("../x", "x"),
     ("dir/", "dir"), ("a//b/./c", "a/b/c"), ("//x", "x")],
)
def test_clean_name(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


def test_rfc3339_seconds_and_nanoseconds() -> None:
    assert parse_rfc3339("1970-01-01T00:00:10Z") == (10, 0)
    assert parse_rfc3339("2023-05-01T10:00:43.769592396Z") == (1682935243, 769592396)
    assert parse_rfc3339("1970-01-01T01:00:00+01:00") == (0, 0)


def test_lower_fixture_chunks_hardlinks_xattrs() -> None:
    toc = parse_toc((NYDUS_FIXTURES / "stargz.index-lower.json").read_bytes())
    assert not toc.has_root_entry and toc.by_name[""].implicit
    large = toc.by_name["root-large"]
    assert [c.offset for c in large.chunks] == [247, 4356, 8465, 12574]
    assert sum(c.size for c in large.chunks) == large.size == 13631488
    assert toc.by_name["sub/sub-1"].xattrs == {"user.key-bar": b"value-bar", "user.key-foo": b"value-foo"}
    assert toc.by_name["root-large-copy"].link_name == "sub/sub-root-large-copy-hardlink"
    assert toc.by_name["sub/sub-root-large-symlink"].link_name == "../root-large"


def test_normalisation_rules() -> None:
    raw = toc_bytes([
        {"name": "./", "type": "dir", "mode": 0o40755, "modtime": "2020-01-01T00:00:00Z"},
        {"name": "./a/b/f", "type": "reg", "mode": 0o104755, "size": 10, "offset": 100,
         "uid": 1000, "userName": "alice", "digest": "sha256:x", "chunkSize": 6,
         "NumLink": 0, "unknownKey": {"nested": True}},
        {"name": "./a/b/f", "type": "chunk", "offset": 200, "chunkOffset": 6},
        {"name": "./g", "type": "reg", "uid": 1000, "xattrs": {"user.k": base64.b64encode(b"v").decode()}},
    ])
    toc = parse_toc(raw)
    assert toc.raw == raw and toc.digest.startswith("sha256:")
    assert toc.by_name[""].mode == 0o755 and toc.by_name[""].mtime == 1577836800
    f = toc.by_name["a/b/f"]
    assert f.mode == 0o4755 and f.st_mode == 0o104755
    assert [(c.offset, c.chunk_offset, c.size) for c in f.chunks] == [(100, 0, 6), (200, 6, 4)]
    assert toc.by_name["a"].implicit and toc.by_name["a/b"].implicit
    assert toc.by_name["g"].user_name == "alice"  # filled from first use
    assert toc.by_name["g"].chunks == []  # empty file: no data


@pytest.mark.parametrize(
    "doc, message",
    [
        (b"not json", "not valid JSON"),
        (b'{"version": 2, "entries": []}', "version must be 1"),
        (toc_bytes([{"name": "x", "type": "socket"}]), "unknown entry type"),
        (toc_bytes([{"name": "x", "type": "chunk"}]), "without a preceding"),
        (toc_bytes([{"name": "x", "type": "reg", "xattrs": {"user.a": "!!"}}]), "not valid base64"),
        (toc_bytes([{"name": "x", "type": "reg", "size": -1}]), "must not be negative"),
        (toc_bytes([{"name": "x", "type": "reg", "size": 4, "chunkSize": 8, "offset": 1}]), "outside"),
        (toc_bytes([{"name": "x", "type": "hardlink"}]), "without 'linkName'"),
    ],
)
def test_bad_tocs_name_the_problem(doc: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_toc(doc)

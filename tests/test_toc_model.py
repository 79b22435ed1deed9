"""The TOC model's normalisation rules (estargz.md §A3/§A8) on nydus's fixtures and crafted TOCs."""

from __future__ import annotations

import base64
import json
import random

import pytest

from stargzfs.errors import FormatError
from stargzfs.digest import sha256_digest
from stargzfs.estargz.toc import Toc, clean_name, parse_rfc3339, parse_toc
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



# --- document shapes: parse_toc accepts exactly what json.loads accepts (guards issue #3-style
# --- rewrites of the parser, e.g. streaming `entries`)

SHAPE_RECORDS: list[dict] = [
    {"name": "./", "type": "dir", "mode": 0o755},
    {"name": "./é/f", "type": "reg", "size": 10, "chunkSize": 4, "offset": 7, "uid": 5, "userName": "u"},
    {"name": "./é/f", "type": "chunk", "chunkOffset": 4, "offset": 20},
    {"name": "./l", "type": "symlink", "linkName": "../é", "uid": 5, "xattrs": {"user.k": "dg=="}},
]


def model(toc: Toc) -> tuple:
    """Everything but the raw bytes (and their digest), which differ between spellings."""
    return toc.version, toc.entries, toc.has_root_entry, toc.by_name


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"entries": SHAPE_RECORDS, "version": 1}, indent=1).encode(),  # version after entries
        json.dumps({"x": {"entries": 5, "version": 2}, "entries": SHAPE_RECORDS, "y": [[{}]], "version": 1},
                   ensure_ascii=False).encode(),  # unknown keys (nested look-alikes) anywhere
        json.dumps({"version": 1, "entries": SHAPE_RECORDS}).replace(", ", " \r\n\t,\n ").replace(
            "[", "\t[ \n").replace("]", " ]\r\n").encode(),  # whitespace around every comma and bracket
        (' \n{ "\\u0076ersion" : 1 , "entr\\u0069es" :' + json.dumps(SHAPE_RECORDS) + "} \n").encode(),
        b"\xef\xbb\xbf" + json.dumps({"version": 1, "entries": SHAPE_RECORDS}).encode(),  # UTF-8 BOM
        json.dumps({"version": 1, "entries": SHAPE_RECORDS}).encode("utf-16"),
        # duplicate keys: the last one wins, as with json.loads
        b'{"entries": [{"type": "nope"}], "version": 2, "version": 1, "entries": '
        + json.dumps(SHAPE_RECORDS).encode() + b"}",
        b'{"version": 1, "entries": [{"name": "old", "type": "dir"}], "entries": '
        + json.dumps(SHAPE_RECORDS).encode() + b"}",
    ],
    ids=["version-last", "unknown-keys", "whitespace", "escaped-keys", "bom", "utf16", "duplicates",
         "duplicate-entries"],
)
def test_document_spellings_give_one_model(raw: bytes) -> None:
    canonical = parse_toc(json.dumps({"version": 1, "entries": SHAPE_RECORDS}, separators=(",", ":")).encode())
    assert canonical.by_name["é/f"].chunks[1].offset == 20 and canonical.by_name["l"].xattrs == {"user.k": b"v"}
    toc = parse_toc(raw)
    assert model(toc) == model(canonical)
    assert toc.raw == raw and toc.digest == sha256_digest(raw)


@pytest.mark.parametrize("raw", [b'{"version": 1}', b'{"entries": null, "version": 1}', b'{"version":1,"entries":[]}'])
def test_empty_and_missing_entries(raw: bytes) -> None:
    toc = parse_toc(raw)
    assert toc.entries == [] and not toc.has_root_entry and list(toc.by_name) == [""]


@pytest.mark.parametrize(
    "raw, message",
    [
        # JSON errors win over entry errors found earlier in the document
        (b'{"version": 1, "entries": [{"type": "socket"}, {]}', "TOC is not valid JSON: Expecting property name"),
        (b'{"version": 1, "entries": [{"type": "socket"}]} x', "TOC is not valid JSON: Extra data"),
        # the version error wins over entry errors, wherever "version" is
        (b'{"entries": [{"type": "socket"}], "version": 2}', "TOC version must be 1, got 2"),
        (b'{"entries": [], "version": "1"}', "TOC version must be 1, got '1'"),
        (b'{"version": 1, "entries": {}}', "TOC 'entries' must be an array"),
        (b'{"version": 1, "entries": [], "entries": 3}', "TOC 'entries' must be an array"),
        (b'{"version": 1, "entries": [{},]}', "TOC is not valid JSON: Expecting value"),
        (b'{"version": 1, "entries": [{} {}]}', "TOC is not valid JSON: Expecting ',' delimiter"),
        (b'{"version": 1,}', "TOC is not valid JSON: Expecting property name"),
        (b"{}", "TOC version must be 1, got None"),
        (b"[]", "TOC must be a JSON object"),
        (b'{"version": 1, "entries": [1]}', "TOC entry #0 is not an object"),
        (b'{"version": 1, "entries": ["\xff"]}', "TOC is not valid JSON: 'utf-8' codec"),
    ],
)
def test_error_precedence(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError) as caught:
        parse_toc(raw)
    assert str(caught.value).startswith(message)


def test_perturbed_tocs_fail_exactly_when_json_loads_does() -> None:
    """Seeded byte edits of a valid TOC: json.loads's error verbatim, or a model / TOC error."""
    rng = random.Random(3)
    base = json.dumps({"version": 1, "entries": SHAPE_RECORDS, "z": {"q": "\\u00e9"}}, indent=1).encode()
    tokens = [b"", b",", b"]", b"}", b"[", b"{", b'"', b":", b" ", b"\\", b"\x01", b"null", b"1", b"\xc3"]
    outcomes = set()
    for _ in range(400):
        cut = rng.randrange(len(base) + 1)
        raw = base[:cut] + rng.choice(tokens) + base[cut + rng.randrange(2):]
        try:
            json.loads(raw)
            json_error = None
        except ValueError as exc:
            json_error = f"TOC is not valid JSON: {exc}"
        try:
            parse_toc(raw)
            outcomes.add("ok")
            assert json_error is None, raw
        except FormatError as exc:
            if json_error:
                outcomes.add("json")
                assert str(exc) == json_error, raw
            else:
                outcomes.add("model")
                assert not str(exc).startswith("TOC is not valid JSON"), raw
    assert outcomes == {"ok", "json", "model"}  # every kind of outcome was exercised

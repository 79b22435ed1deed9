"""The TOC model: normalisation rules (estargz.md §A3/§A8) on nydus's fixtures and crafted TOCs, one-line
errors naming the entry for every malformed or hostile input, and properties over arbitrary input."""

from __future__ import annotations

import base64
import gzip
import json
import random
import resource
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stargzfs.digest import sha256_digest
from stargzfs.errors import FormatError, StargzfsError, UnsupportedError
from stargzfs.estargz.toc import MAX_NAME_BYTES, MAX_NAME_DEPTH, Entry, Toc, clean_name, parse_rfc3339, parse_toc
from support.paths import NYDUS_FIXTURES, VENV_BIN


def toc_bytes(entries: list[dict]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}, indent="\t").encode()


@pytest.mark.parametrize(
    "raw, clean",
    [("./", ""), ("/", ""), ("./etc/", "etc"), ("/abs/file", "abs/file"), ("../x", "x"),
     ("dir/", "dir"), ("a//b/./c", "a/b/c"), ("//x", "x")],
)
def test_clean_name(raw: str, clean: str) -> None:
    assert clean_name(raw) == clean


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(  # components, then a file name (never the root), then perhaps a slash
        st.tuples(st.lists(st.sampled_from(["a", ".", "..", "", ".c", "d."]), max_size=4),
                  st.sampled_from(["f", ".f", "f."]), st.sampled_from(["", "/", "//"]))
        .map(lambda parts: "/".join([*parts[0], parts[1]]) + parts[2]), min_size=1, max_size=6),
    modtimes=st.lists(st.sampled_from(["", "2020-01-01T00:00:00Z", "2021-06-01T00:00:01.5Z"]), min_size=6, max_size=6),
    chunk_sizes=st.lists(st.sampled_from([0, 7]), min_size=6, max_size=6),
)
def test_the_parse_loop_agrees_with_its_helpers(names: list[str], modtimes: list[str], chunk_sizes: list[int]) -> None:
    """The normalising pass inlines the common cases of clean_name, the modtime lookup and a
    one-chunk file: whatever the mix, each entry ends as the helpers themselves say."""
    raw = toc_bytes([
        {"name": name, "type": "reg", "size": 7, "offset": 100 + 10 * number, "chunkSize": chunk_sizes[number],
         "modtime": modtimes[number], "chunkDigest": f"sha256:{number:064x}"}
        for number, name in enumerate(names)
    ])
    for digests in (True, False):
        entries = parse_toc(raw, digests=digests).entries
        assert [entry.name for entry in entries] == [clean_name(name) for name in names]
        for number, entry in enumerate(entries):
            assert (entry.mtime, entry.mtime_nsec) == (parse_rfc3339(modtimes[number]) if modtimes[number] else (0, 0))
            [chunk] = entry.chunks
            assert (chunk.offset, chunk.chunk_offset, chunk.size, chunk.raw_index) == (100 + 10 * number, 0, 7, number)
            assert chunk.digest == (f"sha256:{number:064x}" if digests else None)


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
    assert not toc.by_name["g"].chunks  # empty file: no data


@pytest.mark.parametrize(
    "doc, error, message",
    [
        (b"not json", FormatError, "TOC is not valid JSON: JSON is malformed"),
        (b'{"version": 2, "entries": []}', FormatError, "TOC version must be 1, got 2"),
        (toc_bytes([{"name": "x", "type": "socket"}]), FormatError, "TOC entry #0 ('x'): unknown entry type 'socket'"),
        (toc_bytes([{"name": "x"}]), FormatError, "TOC entry #0 ('x'): Object missing required field `type`"),
        (toc_bytes([{"name": "x", "type": "chunk"}]), FormatError, "TOC entry #0 ('x'): 'chunk' record without"),
        (toc_bytes([{"name": "x", "type": "reg", "xattrs": {"user.a": "!!"}}]), FormatError,
         "TOC entry #0 ('x'): 'xattrs[...]': Invalid base64"),
        (toc_bytes([{"name": "d/", "type": "dir"}, {"name": "x", "type": "reg", "size": -1}]), FormatError,
         "TOC entry #1 ('x'): 'size': Expected `int` >= 0"),
        (toc_bytes([{"name": "x", "type": "reg", "size": 4, "chunkSize": 8, "offset": 1}]), FormatError,
         "TOC entry #0 ('x'): chunk [0, 8) lies outside 'x' of size 4"),
        (toc_bytes([{"name": "x", "type": "hardlink"}]), FormatError, "TOC entry #0 ('x'): hardlink without 'linkName'"),
        (toc_bytes([{"name": "x", "type": "reg", "modtime": "yesterday"}]), FormatError,
         "TOC entry #0 ('x'): not an RFC 3339 time: 'yesterday'"),
        (toc_bytes([{"name": "x", "type": "reg", "modtime": "2021-13-01T00:00:00Z"}]), FormatError,
         "TOC entry #0 ('x'): not an RFC 3339 time"),
        (toc_bytes([{"name": "./", "type": "reg"}]), FormatError, "TOC entry #0 (''): the root entry must be a directory"),
        (toc_bytes([{"name": "x", "type": "reg", "mode": None}]), FormatError,
         "TOC entry #0 ('x'): 'mode': Expected `int`, got `null`"),
        (toc_bytes([{"name": "x", "type": "reg", "uid": True}]), FormatError,
         "TOC entry #0 ('x'): 'uid': Expected `int`, got `bool`"),
        (toc_bytes([{"name": "x", "type": "dir", "size": 1.5}]), FormatError,
         "TOC entry #0 ('x'): 'size': Expected `int`, got `float`"),
        (toc_bytes([{"name": 7, "type": "dir"}]), FormatError, "TOC entry #0 (7): 'name': Expected `str`, got `int`"),
    ],
)
def test_bad_tocs_name_the_problem(doc: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        parse_toc(doc)
    assert type(caught.value) is error and str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


# --- document shapes: one model for every spelling of the same JSON document

SHAPE_RECORDS: list[dict] = [
    {"name": "./", "type": "dir", "mode": 0o755},
    {"name": "./é/f", "type": "reg", "size": 10, "chunkSize": 4, "offset": 7, "uid": 5, "userName": "u"},
    {"name": "./é/f", "type": "chunk", "chunkOffset": 4, "offset": 20},
    {"name": "./l", "type": "symlink", "linkName": "../é", "uid": 5, "xattrs": {"user.k": "dg=="}},
]

MODEL_FIELDS = ("name", "type", "mode", "uid", "gid", "user_name", "group_name", "size", "mtime", "mtime_nsec",
                "link_name", "dev_major", "dev_minor", "digest", "implicit", "raw_index")


def entry_model(entry: Entry) -> tuple:
    """Every normalised attribute (Struct equality sees only the decoded fields)."""
    return (tuple(getattr(entry, name) for name in MODEL_FIELDS), dict(entry.xattrs), list(entry.chunks))


def model(toc: Toc) -> tuple:
    """Everything but the raw bytes (and their digest), which differ between spellings."""
    return (toc.version, [entry_model(e) for e in toc.entries], toc.has_root_entry,
            {name: entry_model(e) for name, e in toc.by_name.items()})


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps({"entries": SHAPE_RECORDS, "version": 1}, indent=1).encode(),  # version after entries
        json.dumps({"x": {"entries": 5, "version": 2}, "entries": SHAPE_RECORDS, "y": [[{}]], "version": 1},
                   ensure_ascii=False).encode(),  # unknown keys (nested look-alikes) anywhere
        json.dumps({"version": 1, "entries": SHAPE_RECORDS}).replace(", ", " \r\n\t,\n ").replace(
            "[", "\t[ \n").replace("]", " ]\r\n").encode(),  # whitespace around every comma and bracket
        (' \n{ "\\u0076ersion" : 1 , "entr\\u0069es" :' + json.dumps(SHAPE_RECORDS) + "} \n").encode(),
        # duplicate keys: the last one wins, as with json.loads and Go
        b'{"entries": [{"type": "fifo"}], "version": 2, "version": 1, "entries": '
        + json.dumps(SHAPE_RECORDS).encode() + b"}",
        b'{"version": 1, "entries": [{"name": "old", "type": "dir"}], "entries": '
        + json.dumps(SHAPE_RECORDS).encode() + b"}",
        # keys that name normalised state but are not TOC keys are ignored like any unknown key
        json.dumps({"version": 1, "entries": [dict(r, mtime=5, chunks=[{}], raw_index="x", implicit=True,
                                                   chunk_offset=-1) for r in SHAPE_RECORDS]}).encode(),
    ],
    ids=["version-last", "unknown-keys", "whitespace", "escaped-keys", "duplicates", "duplicate-entries",
         "state-keys"],
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
        (b'{"version": 1, "entries": [{"type": "socket"}, {]}', "TOC is not valid JSON: JSON is malformed"),
        (b'{"version": 1, "entries": [{"type": "socket"}]} x', "TOC is not valid JSON: JSON is malformed: trailing"),
        # the version error wins over entry errors, wherever "version" is
        (b'{"entries": [{"type": "socket"}], "version": 2}', "TOC version must be 1, got 2"),
        (b'{"entries": [{"type": "reg", "size": "x"}], "version": 2}', "TOC version must be 1, got 2"),
        (b'{"entries": [], "version": "1"}', "TOC version must be 1, got '1'"),
        (b'{"entries": [], "version": true}', "TOC version must be 1, got True"),
        (b'{"entries": [], "version": 1.0}', "TOC version must be 1, got 1.0"),
        (b"{}", "TOC version must be 1, got None"),
        (b'{"version": 1, "entries": {}}', "TOC 'entries': Expected `array | null`, got `object`"),
        (b'{"version": 1, "entries": [], "entries": 3}', "TOC 'entries': Expected `array | null`, got `int`"),
        (b'{"version": 1, "entries": [{},]}', "TOC is not valid JSON: JSON is malformed"),
        (b'{"version": 1, "entries": [{} {}]}', "TOC is not valid JSON: JSON is malformed"),
        (b'{"version": 1,}', "TOC is not valid JSON: JSON is malformed"),
        (b"[]", "TOC must be a JSON object"),
        (b'"version"', "TOC must be a JSON object"),
        (b'{"version": 1, "entries": [1]}', "TOC entry #0: Expected `object`, got `int`"),
        # msgspec checks every value as it reads it: an overridden duplicate must be valid too
        (b'{"version": 1, "entries": [{"type": "nope"}], "entries": []}', "TOC entry #0: unknown entry type 'nope'"),
    ],
)
def test_error_precedence(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError) as caught:
        parse_toc(raw)
    assert str(caught.value).startswith(message), str(caught.value)


# --- hostile input: every failure is one of our errors, in one line, in bounded time and memory


def deep_json(depth: int) -> bytes:
    return b'{"version": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE = [
    ("100k-deep nesting", deep_json(100_000), FormatError, "TOC is not valid JSON: nested too deeply"),
    ("100k-deep nesting in an entry",
     b'{"version": 1, "entries": [{"type": "dir", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
     FormatError, "TOC is not valid JSON: nested too deeply"),
    ("5000-digit integer", b'{"version": 1, "entries": [{"type": "reg", "size": 1' + b"0" * 5000 + b"}]}",
     FormatError, "TOC entry #0: 'size': Integer value out of range"),
    ("5000-digit version", b'{"version": 1' + b"0" * 5000 + b"}", FormatError, "TOC 'version': Integer value"),
    ("beyond int64", toc_bytes([{"name": "f", "type": "reg", "size": 1 << 63}]), FormatError,
     "TOC entry #0 ('f'): 'size': Expected `int` <= 9223372036854775807"),
    ("beyond uint64", toc_bytes([{"name": "f", "type": "reg", "offset": 1 << 64}]), FormatError,
     "TOC entry #0 ('f'): 'offset': Expected `int` <= 9223372036854775807"),
    ("below int64", toc_bytes([{"name": "f", "type": "dir", "uid": -(1 << 63) - 1}]), FormatError,
     "TOC entry #0 ('f'): 'uid': Expected `int` >= 0"),
    ("NaN", b'{"version": 1, "entries": [{"type": "reg", "size": NaN}]}', FormatError, "TOC is not valid JSON"),
    ("1e400", b'{"version": 1, "entries": [{"type": "reg", "size": 1e400}]}', FormatError, "TOC entry #0: 'size'"),
    ("non-UTF-8 name", b'{"version": 1, "entries": [{"type": "reg", "name": "\xff"}]}', FormatError,
     "TOC is not valid JSON: Invalid UTF-8"),
    ("lone surrogate", b'{"version": 1, "entries": [{"type": "reg", "name": "\\ud800"}]}', FormatError,
     "TOC is not valid JSON"),
    ("UTF-8 BOM", b"\xef\xbb\xbf" + toc_bytes([]), FormatError, "TOC is not valid JSON"),
    ("UTF-16", json.dumps({"version": 1, "entries": SHAPE_RECORDS}).encode("utf-16"), FormatError,
     "TOC is not valid JSON"),
    ("empty", b"", FormatError, "TOC is not valid JSON"),
    ("control character", b'{"version": 1, "entries": [{"type": "reg", "name": "a\x01"}]}', FormatError,
     "TOC is not valid JSON"),
    ("60,000-level name", toc_bytes([{"name": "a/" * 60_000 + "f", "type": "reg"}]), FormatError,
     "TOC entry #0 ('a/a/a/"),
    ("deeper than the limit", toc_bytes([{"name": "d/" * MAX_NAME_DEPTH + "f", "type": "reg"}]), FormatError,
     f"has {MAX_NAME_DEPTH + 1} components, over the limit of {MAX_NAME_DEPTH}"),
    ("longer than PATH_MAX", toc_bytes([{"name": "/".join(["é" * 127] * 17), "type": "reg"}]), FormatError,
     f"name is {17 * 254 + 16} bytes long, over PATH_MAX ({MAX_NAME_BYTES})"),
    ("hardlink target beyond PATH_MAX", toc_bytes([{"name": "h", "type": "hardlink", "linkName": "x" * 5000}]),
     FormatError, "TOC entry #0 ('xxx"),
]


@pytest.mark.parametrize("raw, error, message", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_input_is_refused_in_one_line(raw: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(StargzfsError) as caught:
        parse_toc(raw)
    text = str(caught.value)
    assert type(caught.value) is error and message in text, text
    assert "\n" not in text and len(text) < 400


def test_names_at_the_limits_are_accepted() -> None:
    deepest = "/".join(["d"] * MAX_NAME_DEPTH)
    longest = "/".join(["x" * 255] * 16)  # 4095 bytes
    toc = parse_toc(toc_bytes([{"name": deepest, "type": "reg"}, {"name": longest + "/", "type": "dir"}]))
    assert toc.by_name[deepest].type == "reg" and toc.by_name[longest].type == "dir"
    assert toc.by_name[deepest.rpartition("/")[0]].implicit


def test_60000_level_name_fails_fast_and_small(tmp_path: Path) -> None:
    """The hardening issue's TOC: `stargzfs-image create` once took 3.5 GiB and 14 s. Now
    exit 5 with one line, in a child whose address space is capped at 512 MiB."""
    toc = tmp_path / "toc.json"
    toc.write_bytes(toc_bytes([{"name": "a/" * 60_000 + "f", "type": "reg"}]))
    assert len(gzip.compress(toc.read_bytes())) < 1024  # the whole attack fits in 1 KB of gzip

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))

    proc = subprocess.run(
        [str(VENV_BIN / "stargzfs-image"), "create", "--source-type", "stargz_index", "--bootstrap", str(tmp_path / "boot"),
         "--blob-id", "c" * 64, "--blob-meta", str(tmp_path / "meta"), str(toc)],
        capture_output=True, text=True, preexec_fn=cap_memory,
    )
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1 and "over PATH_MAX" in proc.stderr and len(proc.stderr) < 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toc.json"]


def test_perturbed_tocs_give_a_toc_or_one_of_our_errors() -> None:
    """Seeded byte edits of a valid TOC: a Toc, or one FormatError line; and a document that
    json.loads refuses as JSON syntax is never accepted."""
    rng = random.Random(3)
    base = json.dumps({"version": 1, "entries": SHAPE_RECORDS, "z": {"q": "\\u00e9"}}, indent=1).encode()
    tokens = [b"", b",", b"]", b"}", b"[", b"{", b'"', b":", b" ", b"\\", b"\x01", b"null", b"1", b"\xc3", b"-"]
    outcomes = set()
    for _ in range(600):
        cut = rng.randrange(len(base) + 1)
        raw = base[:cut] + rng.choice(tokens) + base[cut + rng.randrange(2):]
        try:
            json.loads(raw)
            json_error = False
        except UnicodeDecodeError:  # msgspec checks UTF-8 only in the strings it keeps
            json_error = None
        except ValueError:
            json_error = True
        try:
            parse_toc(raw)
            outcomes.add("ok")
            assert json_error is not True, raw
        except FormatError as exc:
            assert "\n" not in str(exc)
            outcomes.add("json" if str(exc).startswith("TOC is not valid JSON") else "model")
    assert outcomes == {"ok", "json", "model"}  # every kind of outcome was exercised


# --- property: any bytes, any JSON value, any TOC-shaped document → a Toc or one of our errors

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
TOC_KEYS = ["name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "userName", "groupName",
            "devMajor", "devMinor", "xattrs", "digest", "offset", "chunkOffset", "chunkSize", "chunkDigest",
            "innerOffset"]
TOC_VALUES = (st.sampled_from(["dir", "reg", "chunk", "hardlink", "symlink", "./a", "a/b", "", "..", "dg=="])
              | st.integers(min_value=-2, max_value=1 << 64) | st.sampled_from(["2020-01-01T00:00:00Z", "x"])
              | st.dictionaries(st.sampled_from(["user.a", "system.x"]), st.sampled_from(["dg==", "!"]), max_size=2)
              | JSON_VALUES)
TOC_DOCUMENTS = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1", None]),
     "entries": st.lists(st.dictionaries(st.sampled_from(TOC_KEYS), TOC_VALUES, max_size=8), max_size=8)})


def parses_or_refuses(raw: bytes) -> None:
    try:
        toc = parse_toc(raw)
    except StargzfsError as exc:
        assert type(exc) in (FormatError, UnsupportedError) and "\n" not in str(exc)
        return
    assert toc.raw == raw and all(not e.implicit for e in toc.entries)
    assert all(type(e.mtime) is int and e.mode <= 0o7777 for e in toc.entries)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes(raw: bytes) -> None:
    parses_or_refuses(raw)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_any_json_value(value: object) -> None:
    parses_or_refuses(json.dumps(value).encode())


@settings(max_examples=500, deadline=None)
@given(TOC_DOCUMENTS)
def test_any_toc_shaped_document(document: dict) -> None:
    parses_or_refuses(json.dumps(document).encode())

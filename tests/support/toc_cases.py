"""Crafted TOCs the builder must refuse, shared by the library and CLI tests.

Each row: (id, error class, words the message must contain, TOC JSON bytes).
"""

from __future__ import annotations

import json

from stargzfs.errors import FormatError, UnsupportedError

MIB = 1 << 20


def toc_bytes(*entries: dict) -> bytes:
    return json.dumps({"version": 1, "entries": list(entries)}).encode()


REJECTIONS = [
    ("1 MiB chunks at --chunk-size 4 MiB", UnsupportedError, "does not match --chunk-size",
     toc_bytes({"name": "f", "type": "reg", "size": 2 * MIB, "offset": 10, "chunkSize": MIB},
          {"name": "f", "type": "chunk", "offset": 100, "chunkOffset": MIB})),
    ("innerOffset", UnsupportedError, "innerOffset",
     toc_bytes({"name": "a", "type": "reg", "size": 5, "offset": 10},
          {"name": "b", "type": "reg", "size": 5, "offset": 10, "innerOffset": 512})),
    ("offsets out of order", UnsupportedError, "out of order",
     toc_bytes({"name": "a", "type": "reg", "size": 5, "offset": 100},
          {"name": "b", "type": "reg", "size": 5, "offset": 50})),
    ("missing hardlink target", FormatError, "does not exist",
     toc_bytes({"name": "h", "type": "hardlink", "linkName": "nowhere"})),
    ("hardlink chain to missing", FormatError, "does not exist",
     toc_bytes({"name": "h1", "type": "hardlink", "linkName": "h2"},
          {"name": "h2", "type": "hardlink", "linkName": "gone"})),
    ("hardlink loop", FormatError, "loop",
     toc_bytes({"name": "h1", "type": "hardlink", "linkName": "h2"},
          {"name": "h2", "type": "hardlink", "linkName": "h1"})),
    ("hardlink to a directory", FormatError, "is a directory",
     toc_bytes({"name": "d/", "type": "dir"}, {"name": "h", "type": "hardlink", "linkName": "d"})),
    ("bad xattr namespace", UnsupportedError, "xattr",
     toc_bytes({"name": "f", "type": "reg", "xattrs": {"system.foo": "eA=="}})),
    ("invalid base64 xattr", FormatError, "base64",
     toc_bytes({"name": "f", "type": "reg", "xattrs": {"user.a": "!!!"}})),
    ("name too long", UnsupportedError, "255",
     toc_bytes({"name": "x" * 256, "type": "reg"})),
    ("file used as directory", FormatError, "not one",
     toc_bytes({"name": "f", "type": "reg"}, {"name": "f/g", "type": "reg"})),
    ("hole in chunks", UnsupportedError, "chunk",
     toc_bytes({"name": "f", "type": "reg", "size": 9 * MIB, "offset": 10, "chunkSize": 4 * MIB},
          {"name": "f", "type": "chunk", "offset": 100, "chunkOffset": 8 * MIB})),
]

"""eStargz layers crafted byte by byte with the codecs' own writers (hostile and odd inputs).

ctr-remote makes the honest layers; these are for what no honest tool writes: TOCs that lie,
broken entries, enormous or deep names. Each file gets its own member, as eStargz does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

from stargzfs.estargz.codec import Codec
from stargzfs.estargz.gzip_codec import GZIP


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def crafted_layer(
    files: Mapping[str, bytes] | None = None,
    *,
    extra_entries: Sequence[dict] = (),
    codec: Codec = GZIP,
    toc_json: bytes | None = None,
) -> tuple[bytes, bytes]:
    """(blob, TOC JSON): one member per file (regular, single chunk), then `extra_entries`
    verbatim in the TOC; `toc_json` replaces the TOC the files would give."""
    blob = bytearray(codec.compress(b""))  # the TOC must not start at offset 0
    entries: list[dict] = [{"name": "./", "type": "dir", "mode": 0o755}]
    for name, data in (files or {}).items():
        entry = {"name": name, "type": "reg", "mode": 0o644, "size": len(data), "digest": sha256(data)}
        if data:
            entry.update(offset=len(blob), chunkDigest=sha256(data))
            blob += codec.compress(data)
        entries.append(entry)
    entries += extra_entries
    if toc_json is None:
        toc_json = json.dumps({"version": 1, "entries": entries}).encode()
    blob += codec.encode_toc_and_footer(toc_json, len(blob))
    return bytes(blob), toc_json

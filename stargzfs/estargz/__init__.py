"""eStargz: footer detection, size-capped decompression, the TOC model and two-request TOC fetching.

Re-exports resolve lazily: `stargzfs.estargz.toc` is on the builder's start-up path and
must not drag in the fetch stack (trio, ~70 ms) through this package's import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Decompressor": "decompress",
    "StreamDecoder": "decompress",
    "decompressor_for": "decompress",
    "DEFAULT_MAX_TOC_SIZE": "fetch",
    "DEFAULT_TAIL_SIZE": "fetch",
    "FileRangeReader": "fetch",
    "RangeReader": "fetch",
    "TocResult": "fetch",
    "fetch_toc": "fetch",
    "read_chunk": "fetch",
    "read_toc_file": "fetch",
    "MAX_FOOTER_SIZE": "footer",
    "Footer": "footer",
    "parse_footer": "footer",
    "Chunk": "toc",
    "Entry": "toc",
    "Toc": "toc",
    "parse_toc": "toc",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from stargzfs.estargz.decompress import Decompressor, StreamDecoder, decompressor_for
    from stargzfs.estargz.fetch import (
        DEFAULT_MAX_TOC_SIZE,
        DEFAULT_TAIL_SIZE,
        FileRangeReader,
        RangeReader,
        TocResult,
        fetch_toc,
        read_chunk,
        read_toc_file,
    )
    from stargzfs.estargz.footer import MAX_FOOTER_SIZE, Footer, parse_footer
    from stargzfs.estargz.toc import Chunk, Entry, Toc, parse_toc


_SUBMODULES = frozenset({"decompress", "fetch", "footer", "toc"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `stargzfs.estargz.fetch` worked without an import before
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

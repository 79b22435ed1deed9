"""eStargz: footer detection, size-capped decompression, the TOC model and two-request TOC fetching."""

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

__all__ = [
    "DEFAULT_MAX_TOC_SIZE",
    "DEFAULT_TAIL_SIZE",
    "MAX_FOOTER_SIZE",
    "Chunk",
    "Decompressor",
    "Entry",
    "FileRangeReader",
    "Footer",
    "RangeReader",
    "StreamDecoder",
    "Toc",
    "TocResult",
    "decompressor_for",
    "fetch_toc",
    "parse_footer",
    "parse_toc",
    "read_chunk",
    "read_toc_file",
]

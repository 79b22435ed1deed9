"""Structural validation of a RAFS v6 bootstrap (and its blob.meta files), rafs-v6 §6/§9.

Unlike `read_bootstrap`, which stops at the first fault, this walks everything it can and
collects findings, so one run tells the whole story. Errors are what nydusd or the kernel
would reject; warnings are legal but unusual (e.g. nlink that does not match the tree).
"""

from __future__ import annotations

import json
import stat
from typing import Any

import msgspec

from stargzfs.errors import FormatError
from stargzfs.rafs.blobmeta import ChunkMeta, decode_blob_meta
from stargzfs.rafs.ondisk import (
    BLOB_ENTRY,
    BLOB_FEATURE_ALIGNED,
    BLOB_ID_LEN,
    BLOCK_SIZE,
    CHUNK_FORMAT_BLKBITS_MASK,
    COMPRESSOR_ALGOS,
    DEVICE_SLOT,
    EXT_SUPERBLOCK_OFFSET,
    FILE_TYPE_BY_IFMT,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    MAX_CHUNK_COUNT,
    NYDUS_FEATURE_INCOMPAT,
    BlobEntry,
    ChunkRecord,
    Inode,
)
from stargzfs.rafs.reader import BootstrapReader, chunk_table_map, flags_compressor, flags_digester

MAX_FINDINGS = 200


class CheckReport(msgspec.Struct):
    size: int = 0
    errors: list[str] = msgspec.field(default_factory=list)
    warnings: list[str] = msgspec.field(default_factory=list)
    blobs: list[str] = msgspec.field(default_factory=list)
    inodes: int = 0
    directories: int = 0
    files: int = 0
    symlinks: int = 0
    others: int = 0
    chunk_indexes: int = 0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, message: str) -> None:
        if len(self.errors) < MAX_FINDINGS:
            self.errors.append(message)
        else:
            self.truncated = True

    def warn(self, message: str) -> None:
        if len(self.warnings) < MAX_FINDINGS:
            self.warnings.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "size": self.size, "blobs": self.blobs, "inodes": self.inodes,
            "directories": self.directories, "files": self.files, "symlinks": self.symlinks,
            "others": self.others, "chunk_indexes": self.chunk_indexes, "errors": self.errors,
            "warnings": self.warnings, "truncated": self.truncated,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self, verbose: bool = False) -> str:
        lines = [
            f"bootstrap: {self.size} bytes, {self.inodes} paths ({self.directories} dirs, {self.files} files, "
            f"{self.symlinks} symlinks, {self.others} other), {self.chunk_indexes} chunk indexes",
            "blobs: " + (", ".join(self.blobs) if self.blobs else "(none)"),
        ]
        lines += [f"error: {e}" for e in self.errors]
        if verbose or self.errors:
            lines += [f"warning: {w}" for w in self.warnings]
        if self.truncated:
            lines.append(f"error: more than {MAX_FINDINGS} errors, the rest were not listed")
        lines.append("check: OK" if self.ok else f"check: FAILED ({len(self.errors)} errors)")
        return "\n".join(lines)


def check_bootstrap(data: bytes, blob_metas: dict[int, bytes] | None = None) -> CheckReport:
    """`blob_metas` maps blob index → blob.meta bytes to cross-check chunk by chunk."""
    report = CheckReport(size=len(data))
    if len(data) % BLOCK_SIZE:
        report.error(f"file size {len(data)} is not a multiple of {BLOCK_SIZE}")
        data = data[:len(data) - len(data) % BLOCK_SIZE]  # check what is there
    try:
        reader = BootstrapReader(data)
    except FormatError as exc:
        report.error(str(exc))
        return report
    if not reader.is_rafs:
        report.error("feature_compat lacks RAFS_V6 (0x40000000): a plain EROFS image, not a nydus bootstrap")
    _check_superblocks(reader, report)
    entries = _guard(report, reader.blob_entries, [])
    slots = _guard(report, reader.device_slots, [])
    records = _guard(report, reader.chunk_records, [])
    report.blobs = [e.blob_id.rstrip(b"\0").decode("ascii", "replace") for e in entries]
    _check_blobs(reader, entries, slots, report)
    _check_chunk_table(records, entries, report)
    metas = _decode_metas(blob_metas or {}, entries, report)
    _walk(reader, chunk_table_map(records), entries, metas, report)
    if report.inodes != reader.sb.inos:
        report.warn(f"superblock inos {reader.sb.inos} differs from the {report.inodes} paths in the tree")
    return report


def _guard(report: CheckReport, func: Any, default: Any) -> Any:
    try:
        return func()
    except FormatError as exc:
        report.error(str(exc))
        return default


def _check_superblocks(reader: BootstrapReader, report: CheckReport) -> None:
    sb, ext, size = reader.sb, reader.ext, len(reader.data)
    if sb.checksum:
        report.error(f"superblock checksum {sb.checksum:#x} must be 0 (nydusd rejects checksummed bootstraps)")
    if sb.extslots:
        report.error(f"superblock extslots {sb.extslots} must be 0")
    if sb.feature_incompat != NYDUS_FEATURE_INCOMPAT:
        report.error(f"feature_incompat {sb.feature_incompat:#x} must be {NYDUS_FEATURE_INCOMPAT:#x} "
                     "(CHUNKED_FILE|DEVICE_TABLE)")
    if sb.inos == 0 or sb.blocks == 0:
        report.error(f"superblock inos {sb.inos} / blocks {sb.blocks} must be non-zero")
    if sb.u1:
        report.error(f"superblock compression field {sb.u1} must be 0")
    if sb.devt_slotoff * 128 < EXT_SUPERBLOCK_OFFSET + 256:
        report.error(f"devt_slotoff {sb.devt_slotoff} overlaps the superblocks")
    if reader.meta_base >= size:
        report.error(f"meta_blkaddr {sb.meta_blkaddr} lies beyond the file")
    if flags_compressor(ext.flags) is None or flags_digester(ext.flags) is None:
        report.error(f"extended superblock flags {ext.flags:#x} need exactly one compressor and one digester bit")
    if ext.blob_table_offset % BLOCK_SIZE:
        report.error(f"blob table offset {ext.blob_table_offset} is not 4096-aligned")
    if ext.blob_table_size != BLOB_ENTRY.size * sb.extra_devices:
        report.error(f"blob table size {ext.blob_table_size} does not hold the {sb.extra_devices} devices")
    chunk_size = ext.chunk_size
    if chunk_size & (chunk_size - 1) or not 0x1000 <= chunk_size <= 0x1000000:
        report.error(f"chunk size {chunk_size:#x} is not a power of two in 0x1000..0x1000000")
    if ext.chunk_table_offset + ext.chunk_table_size > size:
        report.error(f"chunk table [{ext.chunk_table_offset}, +{ext.chunk_table_size}) lies beyond the file")
    if ext.prefetch_table_size and ext.prefetch_table_offset + ext.prefetch_table_size > size:
        report.error("prefetch table lies beyond the file")


def _check_blobs(reader: BootstrapReader, entries: list[BlobEntry], slots: list[Any], report: CheckReport) -> None:
    ext = reader.ext
    compressor = flags_compressor(ext.flags)
    for i, entry in enumerate(entries):
        where = f"blob {i}"
        if len(entry.blob_id.rstrip(b"\0")) != BLOB_ID_LEN:
            report.error(f"{where}: blob id must be {BLOB_ID_LEN} characters")
        if entry.blob_index != i:
            report.error(f"{where}: blob_index {entry.blob_index} differs from its position")
        if entry.chunk_size != ext.chunk_size:
            report.error(f"{where}: chunk size {entry.chunk_size:#x} differs from the superblock's {ext.chunk_size:#x}")
        if entry.chunk_count >= MAX_CHUNK_COUNT:
            report.error(f"{where}: chunk count {entry.chunk_count} is not below 2^24")
        if not entry.meta_features & BLOB_FEATURE_ALIGNED:
            report.error(f"{where}: meta features {entry.meta_features:#x} lack ALIGNED (0x1)")
        if entry.ci_compressed_size != 16 * entry.chunk_count or entry.ci_uncompressed_size != 16 * entry.chunk_count:
            report.error(f"{where}: chunk-info sizes {entry.ci_compressed_size}/{entry.ci_uncompressed_size} "
                         f"!= 16 x {entry.chunk_count}")
        if any(entry.ci_digest):
            report.error(f"{where}: ci_digest must be zero")
        if compressor is not None and entry.compression_algo != COMPRESSOR_ALGOS[compressor]:
            report.warn(f"{where}: compression algo {entry.compression_algo} differs from the superblock flags")
        if i < len(slots):
            slot = slots[i]
            if slot.tag != entry.blob_id:
                report.error(f"{where}: device slot tag {slot.tag!r} differs from the blob id")
            if slot.blocks != entry.uncompressed_size >> 12:
                report.error(f"{where}: device slot blocks {slot.blocks} != uncompressed size >> 12 "
                             f"({entry.uncompressed_size >> 12})")
    if len(slots) != len(entries):
        report.error(f"{len(slots)} device slots for {len(entries)} blobs")
    if entries:
        slot_end = reader.sb.devt_slotoff * 128 + DEVICE_SLOT.size * len(slots)
        if slot_end > ext.blob_table_offset:
            report.error("device slots overlap the blob table")


def _check_chunk_table(records: list[ChunkRecord], entries: list[BlobEntry], report: CheckReport) -> None:
    keys = [(r.block_id, r.blob_index) for r in records]
    if any(a >= b for a, b in zip(keys, keys[1:])):
        report.error("chunk table is not sorted by (block id, blob) or has duplicate keys")
    for position, r in enumerate(records):
        if r.blob_index >= len(entries):
            report.error(f"chunk record {position}: blob index {r.blob_index} has no blob")
        elif r.index >= max(entries[r.blob_index].chunk_count, 1):
            report.error(f"chunk record {position}: index {r.index} >= blob chunk count "
                         f"{entries[r.blob_index].chunk_count}")
        if r.uncompressed_offset % BLOCK_SIZE:
            report.error(f"chunk record {position}: uncompressed offset {r.uncompressed_offset} is not 4 KiB aligned")


def _decode_metas(blob_metas: dict[int, bytes], entries: list[BlobEntry], report: CheckReport) -> dict[int, list[ChunkMeta]]:
    decoded: dict[int, list[ChunkMeta]] = {}
    for index, data in sorted(blob_metas.items()):
        if index >= len(entries):
            report.error(f"blob.meta given for blob {index}, but the bootstrap has {len(entries)} blobs")
            continue
        try:
            header, chunks = decode_blob_meta(data)
        except FormatError as exc:
            report.error(f"blob {index}: {exc}")
            continue
        entry = entries[index]
        expected = (entry.meta_features, entry.ci_compressor, entry.ci_offset, entry.ci_compressed_size,
                    entry.ci_uncompressed_size, entry.chunk_count)
        got = (header.features, header.ci_compressor, header.ci_offset, header.ci_compressed_size,
               header.ci_uncompressed_size, header.ci_entries)
        if expected != got:
            report.error(f"blob {index}: blob.meta header {got} does not match the blob table entry {expected}")
        decoded[index] = chunks
    return decoded


def _walk(
    reader: BootstrapReader,
    table: dict[tuple[int, int, int], ChunkRecord],
    entries: list[BlobEntry],
    metas: dict[int, list[ChunkMeta]],
    report: CheckReport,
) -> None:
    root_nid = reader.sb.root_nid
    seen_dirs = {root_nid}
    seen_files: set[int] = set()
    stack = [(root_nid, root_nid, "/")]
    chunk_size = reader.ext.chunk_size
    while stack:
        nid, parent_nid, path = stack.pop()
        report.inodes += 1
        try:
            inode = reader.inode(nid)
            reader.xattrs(nid, inode)
        except FormatError as exc:
            report.error(f"{path}: {exc}")
            continue
        if not stat.S_ISDIR(inode.mode):
            report.error(f"{path}: root inode is not a directory")
            continue
        report.directories += 1
        if inode.layout not in (LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE):
            report.error(f"{path}: directory layout {inode.layout} is not plain/inline")
            continue
        try:
            dirents = reader.dirents(nid, inode)
        except FormatError as exc:
            report.error(f"{path}: {exc}")
            continue
        names = [name for name, _, _ in dirents]
        if any(a >= b for a, b in zip(names, names[1:])):
            report.error(f"{path}: dirents are not strictly sorted by name bytes")
        by_name = {name: (child, ftype) for name, child, ftype in dirents}
        if by_name.get(b".", (None,))[0] != nid or by_name.get(b"..", (None,))[0] != parent_nid:
            report.error(f"{path}: '.' / '..' do not point at the directory / its parent")
        subdirs = 0
        for name, child_nid, ftype in dirents:
            if name in (b".", b".."):
                continue
            child_path = path.rstrip("/") + "/" + name.decode("utf-8", "replace")
            try:
                child = reader.inode(child_nid)
            except FormatError as exc:
                report.error(f"{child_path}: {exc}")
                continue
            expected_type = FILE_TYPE_BY_IFMT.get((child.mode >> 12) & 0o17)
            if ftype != expected_type:
                report.error(f"{child_path}: dirent file type {ftype} does not match mode {child.mode:#o}")
            if stat.S_ISDIR(child.mode):
                subdirs += 1
                if child_nid in seen_dirs:
                    report.error(f"{child_path}: directory nid {child_nid} is reachable twice")
                    continue
                seen_dirs.add(child_nid)
                stack.append((child_nid, nid, child_path))
                continue
            report.inodes += 1
            if child_nid in seen_files:
                continue  # hardlink: the inode was checked at its first path
            seen_files.add(child_nid)
            _check_leaf(reader, child_nid, child, child_path, chunk_size, table, entries, metas, report)
        if inode.nlink != 2 + subdirs:
            report.warn(f"{path}: nlink {inode.nlink} but {subdirs} subdirectories")


def _check_leaf(
    reader: BootstrapReader, nid: int, inode: Inode, path: str, chunk_size: int,
    table: dict[tuple[int, int, int], ChunkRecord], entries: list[BlobEntry],
    metas: dict[int, list[ChunkMeta]], report: CheckReport,
) -> None:
    try:
        reader.xattrs(nid, inode)
        if stat.S_ISLNK(inode.mode):
            report.symlinks += 1
            reader.inline_data(nid, inode)
            return
        if not stat.S_ISREG(inode.mode):
            report.others += 1
            return
        report.files += 1
        if inode.size == 0:
            return
        file_chunk_size = 1 << (12 + (inode.i_u & CHUNK_FORMAT_BLKBITS_MASK))
        if file_chunk_size != chunk_size:
            report.error(f"{path}: chunk size {file_chunk_size:#x} differs from the superblock's {chunk_size:#x}")
        indexes = reader.chunk_indexes(nid, inode)
    except FormatError as exc:
        report.error(f"{path}: {exc}")
        return
    for position, index in enumerate(indexes):
        report.chunk_indexes += 1
        blob = index.device_id - 1
        if not 0 <= blob < len(entries):
            report.error(f"{path}: chunk {position} uses device {index.device_id}, the bootstrap has {len(entries)}")
            continue
        record = table.get((blob, index.chunk_index, index.blkaddr))
        if record is None:
            report.error(f"{path}: chunk {position} (blob {blob}, index {index.chunk_index}, block {index.blkaddr}) "
                         "is missing from the chunk table")
            continue
        expected = min(chunk_size, inode.size - position * chunk_size)
        if record.uncompressed_size != expected or record.file_offset != position * chunk_size:
            report.error(f"{path}: chunk {position} covers {record.uncompressed_size} bytes at file offset "
                         f"{record.file_offset}, expected {expected} at {position * chunk_size}")
        chunks = metas.get(blob)
        if chunks is not None:
            if index.chunk_index >= len(chunks):
                report.error(f"{path}: chunk index {index.chunk_index} has no blob.meta entry")
                continue
            meta = chunks[index.chunk_index]
            if (meta.uncompressed_offset, meta.uncompressed_size, meta.compressed_offset) != (
                record.uncompressed_offset, record.uncompressed_size, record.compressed_offset
            ):
                report.error(f"{path}: chunk {position} differs between blob.meta entry {index.chunk_index} and "
                             "the chunk table")

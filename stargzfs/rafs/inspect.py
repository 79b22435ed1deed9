"""Read-only views of a bootstrap (nydus-image inspect's stats/ls/stat/blobs/chunk), as
JSON-ready dicts plus a plain-text rendering."""

from __future__ import annotations

import base64
import stat
from typing import Any

import msgspec

from stargzfs.errors import UsageError
from stargzfs.rafs.ondisk import new_decode_dev
from stargzfs.rafs.reader import BootstrapReader, read_bootstrap
from stargzfs.rafs.tree import Node, RafsImage

COMMANDS = ("stats", "ls", "stat", "blobs", "chunks")
PATH_COMMANDS = ("ls", "stat", "chunks")
_TYPE_NAMES = {
    stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


def _type(node: Node) -> str:
    return _TYPE_NAMES.get(stat.S_IFMT(node.mode), "unknown")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _lookup(image: RafsImage, path: str) -> Node:
    node = image.lookup(path)
    if node is None:
        raise UsageError(f"no such path in the bootstrap: {path!r}")
    return node


def inspect_bootstrap(data: bytes, command: str, path: str | None = None) -> Any:
    """FormatError on a corrupt bootstrap, UsageError on a bad command or path."""
    if command not in COMMANDS:
        raise UsageError(f"unknown inspect command {command!r} (one of {', '.join(COMMANDS)})")
    if command in PATH_COMMANDS and not path:
        raise UsageError(f"inspect {command} needs a PATH")
    reader = BootstrapReader(data)
    image = read_bootstrap(data)
    if command == "stats":
        return _stats(reader, image)
    if command == "blobs":
        return [dict(msgspec.structs.asdict(blob), blob_index=i) for i, blob in enumerate(image.blobs)]
    node = _lookup(image, path or "/")
    if command == "ls":
        if node.children is None:
            raise UsageError(f"{path!r} is not a directory")
        return [
            {"name": _text(name), "type": _type(child), "mode": f"{stat.S_IMODE(child.mode):04o}",
             "size": child.size, "nid": child.nid}
            for name, child in sorted(node.children.items())
        ]
    if command == "stat":
        return _stat(reader, node, path or "/")
    return [
        {"file_offset": c.file_offset, "blob_index": c.blob_index, "chunk_index": c.chunk_index,
         "uncompressed_offset": c.uncompressed_offset, "uncompressed_size": c.uncompressed_size,
         "compressed_offset": c.compressed_offset, "compressed_size": c.compressed_size,
         "block_id": c.block_id.hex()}
        for c in node.chunks
    ]


def _stats(reader: BootstrapReader, image: RafsImage) -> dict[str, Any]:
    counts = {"dir": 0, "file": 0, "symlink": 0, "other": 0}
    paths = hardlinked = chunk_indexes = 0
    inodes: set[int] = set()
    for _, node in image.walk():
        paths += 1
        if node.nid in inodes:
            hardlinked += 1
            continue
        inodes.add(node.nid)
        kind = _type(node)
        counts[kind if kind in counts else "other"] += 1
        chunk_indexes += len(node.chunks)
    return {
        "size": len(reader.data), "paths": paths, "inodes": len(inodes), "hardlink_paths": hardlinked,
        "directories": counts["dir"], "files": counts["file"], "symlinks": counts["symlink"],
        "others": counts["other"], "chunk_indexes": chunk_indexes, "blobs": len(image.blobs),
        "chunk_size": image.chunk_size, "compressor": image.compressor, "digester": image.digester,
        "explicit_uid_gid": image.explicit_uid_gid, "flags": reader.ext.flags,
        "root_nid": reader.sb.root_nid, "meta_blkaddr": reader.sb.meta_blkaddr,
    }


def _stat(reader: BootstrapReader, node: Node, path: str) -> dict[str, Any]:
    inode = reader.inode(node.nid)
    out: dict[str, Any] = {
        "path": path, "nid": node.nid, "ino": inode.ino, "type": _type(node),
        "mode": f"{stat.S_IMODE(node.mode):04o}", "uid": node.uid, "gid": node.gid, "size": node.size,
        "nlink": inode.nlink, "mtime": node.mtime, "mtime_nsec": node.mtime_nsec,
        "layout": inode.layout, "extended_inode": inode.extended, "chunks": len(node.chunks),
        "xattrs": {_text(k): base64.b64encode(v).decode() for k, v in node.xattrs},
    }
    if node.symlink is not None:
        out["target"] = _text(node.symlink)
    if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
        out["rdev"] = list(new_decode_dev(node.rdev))
    return out


def render_text(command: str, result: Any) -> str:
    if command in ("stats", "stat"):
        return "\n".join(f"{key}: {value}" for key, value in result.items())
    if command == "ls":
        return "\n".join(f"{e['mode']} {e['type']:<7} {e['size']:>12} {e['nid']:>8} {e['name']}" for e in result)
    if command == "blobs":
        return "\n".join(
            f"{b['blob_index']}: {b['blob_id']} chunks={b['chunk_count']} chunk_size={b['chunk_size']:#x} "
            f"uncompressed={b['uncompressed_size']} compressor={b['compressor']}"
            for b in result
        )
    return "\n".join(
        f"{c['file_offset']:>12} blob={c['blob_index']} index={c['chunk_index']} "
        f"u=[{c['uncompressed_offset']}, +{c['uncompressed_size']}) c={c['compressed_offset']}"
        for c in result
    )

"""The shared four-layer stack of issue #4 and its overlayfs oracle, used by the merge, pipeline
and external-builder tests.

Every test module gets the same ctr-remote image per compression through `stacked_image`, so the
session builds each one once (one `image_cache` key and one repository name per compression).
"""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from support.erofs import extract_layer_tar
from support.images import FileSpec, PushedImage, build_image, make_layer_tar

if TYPE_CHECKING:
    from support.images import Containerd, ImageCache
    from support.registry import RegistryProcess

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
FIVE_MIB = 5 << 20  # two 4 MiB chunks: a file whose chunks must both land on the right device


def deterministic_data(seed: int, size: int) -> bytes:
    """Incompressible bytes that are the same in every run, so image digests stay reproducible."""
    return random.Random(seed).randbytes(size)


def stacked_layers() -> list[list[FileSpec]]:
    """Four layers, base first, covering every whiteout/replacement case of issue #4; the last
    one carries no data blob. Hardlinks come after their targets so GNU tar can extract them."""
    base = [
        FileSpec("etc", kind="dir", mode=0o755, mtime=1_600_000_001),
        FileSpec("etc/keep.txt", data=b"kept from the base\n", xattrs={"user.origin": b"base"}, mtime=1_600_000_002),
        FileSpec("etc/remove-me.txt", data=b"deleted by layer 1\n", mtime=1_600_000_003),
        FileSpec("etc/later.txt", data=b"deleted by the data-free layer\n", mtime=1_600_000_003),
        FileSpec("etc/hl-a", data=b"two names, one inode\n", mode=0o640, uid=7, gid=8, mtime=1_600_000_004),
        FileSpec("etc/hl-b", kind="hardlink", target="etc/hl-a", mtime=1_600_000_004),
        FileSpec("etc/phantom", kind="whiteout", mtime=1_600_000_005),  # base whiteout: hides nothing
        FileSpec("ghost", kind="whiteout", mtime=1_600_000_005),
        FileSpec("olddir", kind="dir", mtime=1_600_000_006),
        FileSpec("olddir/a", data=b"must not resurface\n", mtime=1_600_000_007),
        FileSpec("olddir/sub", kind="dir", mtime=1_600_000_008),
        FileSpec("olddir/sub/b", data=b"nor this\n", mtime=1_600_000_009),
        FileSpec("opq", kind="dir", mtime=1_600_000_010),
        FileSpec("opq/x", data=b"hidden by an opaque dir\n", mtime=1_600_000_011),
        FileSpec("opq/y", kind="symlink", target="x", mtime=1_600_000_012),
        FileSpec("opq2", kind="dir", mtime=1_600_000_012),
        FileSpec("opq2/old", data=b"hidden for good\n", mtime=1_600_000_012),
        FileSpec("opq2/old-dir", kind="dir", mtime=1_600_000_012),
        FileSpec("will-be-dir", data=b"a file first\n", mtime=1_600_000_013),
        FileSpec("will-be-file", kind="dir", mtime=1_600_000_014),
        FileSpec("will-be-file/inner", data=b"gone with its dir\n", mtime=1_600_000_015),
        FileSpec("recreate.txt", data=b"first life\n", mtime=1_600_000_016),
        FileSpec("link", kind="symlink", target="etc/keep.txt", mtime=1_600_000_017),
        FileSpec("big", data=deterministic_data(1, FIVE_MIB), mtime=1_600_000_018),
        FileSpec("fifo", kind="fifo", mode=0o600, mtime=1_600_000_019),
        FileSpec("cycle", kind="dir", mtime=1_600_000_020),
        FileSpec("cycle/old", data=b"must stay buried under layer 1's file\n", mtime=1_600_000_020),
    ]
    layer1 = [
        FileSpec("etc", kind="dir", mode=0o750, uid=3, gid=4, mtime=1_600_001_001),
        FileSpec("etc/remove-me.txt", kind="whiteout", mtime=1_600_001_002),
        FileSpec("etc/hl-a", kind="whiteout", mtime=1_600_001_002),  # hl-b survives alone
        FileSpec("olddir", kind="whiteout", mtime=1_600_001_003),
        FileSpec("opq", kind="dir", mode=0o700, mtime=1_600_001_004),
        FileSpec("opq", kind="opaque", mtime=1_600_001_005),
        FileSpec("opq/z", data=b"the only child of opq\n", mtime=1_600_001_006),
        FileSpec("opq2", kind="dir", mtime=1_600_001_006),
        FileSpec("opq2/new", data=b"opaque from layer 1 on\n", mtime=1_600_001_006),
        FileSpec("opq2", kind="opaque", mtime=1_600_001_006),  # marker after a sibling
        FileSpec("will-be-dir", kind="dir", mtime=1_600_001_007),
        FileSpec("will-be-dir/child", data=b"a dir now\n", xattrs={"user.k": b"\x00\xffv"}, mtime=1_600_001_008),
        FileSpec("will-be-file", kind="whiteout", mtime=1_600_001_009),
        FileSpec("will-be-file", data=b"a file now\n", mtime=1_600_001_010),
        FileSpec("recreate.txt", kind="whiteout", mtime=1_600_001_011),
        FileSpec("bin", kind="dir", mtime=1_600_001_012),
        FileSpec("bin/tool", data=deterministic_data(2, 70_000), mode=0o755, mtime=1_600_001_013),
        FileSpec("bin/tool-alias", kind="hardlink", target="bin/tool", mtime=1_600_001_013),
        FileSpec("bin/tool-alias2", kind="hardlink", target="bin/tool", mtime=1_600_001_013),
        FileSpec("link", data=b"a symlink replaced by a file\n", mtime=1_600_001_014),
        FileSpec("cycle", data=b"a file over a dir, no whiteout\n", mtime=1_600_001_015),
    ]
    layer2 = [
        FileSpec("recreate.txt", data=b"second life\n", mtime=1_600_002_001),
        FileSpec("olddir", kind="dir", mtime=1_600_002_002),
        FileSpec("olddir/new", data=b"fresh\n", mtime=1_600_002_003),
        FileSpec("cycle", kind="dir", mtime=1_600_002_003),  # a dir again: starts empty
        FileSpec("cycle/new", data=b"new\n", mtime=1_600_002_003),
        FileSpec("opq", kind="whiteout", mtime=1_600_002_004),  # whiteout + re-creation in one layer
        FileSpec("opq", kind="dir", mode=0o755, mtime=1_600_002_005),
        FileSpec("opq/fresh", data=b"only this\n", mtime=1_600_002_006),
        FileSpec("nothing", kind="whiteout", mtime=1_600_002_007),  # whiteout of nothing: no-op
        FileSpec("bin", kind="dir", mtime=1_600_002_008),
        FileSpec("bin/tool-alias", kind="whiteout", mtime=1_600_002_009),
        FileSpec("bin/extra", data=deterministic_data(3, 9_000), xattrs={"trusted.t": b"t", "user.a": b"1"},
                 mtime=1_600_002_010),
    ]
    data_free = [  # no data blob: directories and whiteouts only
        FileSpec("etc", kind="dir", mode=0o700, mtime=1_600_003_001),
        FileSpec("etc/later.txt", kind="whiteout", mtime=1_600_003_002),
        FileSpec("empty-dir", kind="dir", mode=0o711, mtime=1_600_003_003),
        FileSpec("will-be-dir", kind="dir", mtime=1_600_003_004),
        FileSpec("will-be-dir/child", kind="whiteout", mtime=1_600_003_005),
    ]
    return [base, layer1, layer2, data_free]


def eight_layers() -> list[list[FileSpec]]:
    """Eight one-file layers: digests the e2e and conversion tests give chains of their own."""
    return [
        [FileSpec(f"layer{index}", kind="dir"), FileSpec(f"layer{index}/file.txt", data=f"layer {index}\n".encode() * 50)]
        for index in range(8)
    ]


def stacked_image(
    image_cache: ImageCache, containerd: Containerd, registry: RegistryProcess, compression: str
) -> PushedImage:
    """The stacked layers converted by ctr-remote (gzip → eStargz, zstd → zstd:chunked), built once
    per session whichever module asks first."""
    return image_cache.get(
        ("test_merge_kernel", compression),
        lambda: build_image(containerd, registry, f"merge-kernel/{compression}", stacked_layers(),
                            compression=compression),
    )


def to_overlay_form(layer_dir: Path, lower_dirs: Sequence[Path]) -> None:
    """Rewrite an extracted OCI layer into overlayfs's whiteout form, in place.

    `.wh.X` → char device 0:0 named X, `.wh..wh..opq` → trusted.overlay.opaque=y on its
    directory. A whiteout in a directory that no lower layer has hides nothing, so it is
    simply dropped: overlayfs would list such a whiteout as an unreadable entry when the
    directory is not merged, which no runtime ever shows (they apply whiteouts when
    unpacking). Directory mtimes are restored after the rewrite.
    """
    for directory, _dirnames, filenames in os.walk(layer_dir, topdown=False):
        here = Path(directory)
        markers = [name for name in filenames if name.startswith(WHITEOUT_PREFIX)]
        if not markers:
            continue
        times = here.stat()
        rel = here.relative_to(layer_dir)
        merged_below = any((lower / rel).is_dir() and not (lower / rel).is_symlink() for lower in lower_dirs)
        for name in markers:
            (here / name).unlink()
            if not merged_below:
                continue
            if name == OPAQUE_MARKER:
                os.setxattr(here, OVERLAY_OPAQUE_XATTR, b"y")
                continue
            if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                continue  # other AUFS meta files (.wh..wh.plnk …): ignored like containerd does
            hidden = here / name[len(WHITEOUT_PREFIX):]
            if hidden.is_dir() and not hidden.is_symlink():
                # re-created in this same layer: a fresh dir over the old one = an opaque dir
                os.setxattr(hidden, OVERLAY_OPAQUE_XATTR, b"y")
            elif not os.path.lexists(hidden):
                os.mknod(hidden, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        os.utime(here, ns=(times.st_atime_ns, times.st_mtime_ns))


def stacked_overlay_lowers(base: Path) -> list[Path]:
    """The stacked layers extracted by GNU tar into `base` and rewritten into overlayfs form,
    as overlayfs lowers (top first). Built on the first call for a `base`, reused after."""
    layer_roots = [base / f"layer{number}" for number in range(len(stacked_layers()))]
    if not layer_roots[-1].exists():  # the top layer is extracted last
        extracted: list[Path] = []
        for layer_root, files in zip(layer_roots, stacked_layers()):
            extract_layer_tar(make_layer_tar(files, layer_root.with_suffix(".tar")), layer_root)
            to_overlay_form(layer_root, extracted)
            extracted.append(layer_root)
    return list(reversed(layer_roots))

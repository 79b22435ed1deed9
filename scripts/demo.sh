#!/usr/bin/env bash
# stargzfs end to end on a fresh machine (as root), in about a minute:
#   loopback registry -> real multi-layer eStargz image (ctr-remote, private containerd)
#   -> snapshotter root with a real metadata.db (containerd's own snapshots/storage code)
#   -> `stargzfs mount` -> lazy bootstraps + image.boot -> `stargzfs-image inspect`
#   -> blob caches materialized -> the merged image mounted by the kernel's erofs.
# Everything it starts or mounts is stopped/unmounted and its work dir removed on exit.
# Usage: scripts/demo.sh [--keep]   (--keep leaves the work dir for a look afterwards)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
if [ "$(id -u)" != 0 ]; then
  echo "demo.sh: must run as root (FUSE allow_other, kernel erofs mounts, private containerd)" >&2
  exit 1
fi

cd "$REPO"
echo "=== setup: apt packages and .venv (idempotent) ==="
# shellcheck source=setup.sh
. scripts/setup.sh

WORK="$(mktemp -d /tmp/stargzfs-demo.XXXXXX)"
export STARGZFS_DEMO_WORK="$WORK"

cleanup() {
  local status=$?
  for target in "$WORK/erofs" "$WORK/mnt"; do
    if mountpoint -q "$target" 2>/dev/null; then
      fusermount3 -u "$target" 2>/dev/null || umount "$target" 2>/dev/null || umount -l "$target" 2>/dev/null || true
    fi
  done
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$WORK/pids"
  fi
  if [ "$KEEP" = 1 ]; then
    echo "demo: work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $status
}
trap cleanup EXIT INT TERM

PATH="$REPO/.venv/bin:$PATH" "$REPO/.venv/bin/python" - "$REPO" "$WORK" <<'PYTHON'
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO, WORK = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(REPO / "tests"))
from support.gohelper import Snapdb, build_snapdb  # noqa: E402
from support.images import Containerd, FileSpec, build_image  # noqa: E402
from support.registry import RegistryProcess  # noqa: E402

BIN = REPO / ".venv" / "bin"


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(*argv: object, capture: bool = False) -> str:
    print("$ " + " ".join(shlex.quote(str(a)) for a in argv), flush=True)
    done = subprocess.run([str(a) for a in argv], text=True, capture_output=capture, check=True)
    return done.stdout if capture else ""


def remember_pid(pid: int) -> None:
    with open(WORK / "pids", "a") as pids:
        pids.write(f"{pid}\n")


LAYERS = [
    [FileSpec("etc", kind="dir"), FileSpec("etc/os-release", data=b'NAME="stargzfs demo"\n'),
     FileSpec("usr/share/doc/readme.txt", data=b"from the base layer\n" * 100),
     FileSpec("tmp/scratch.txt", data=b"removed by the top layer\n")],
    [FileSpec("app", kind="dir"), FileSpec("app/main.py", data=b'print("hello from an eStargz layer")\n', mode=0o755),
     FileSpec("app/data.bin", data=os.urandom(3 << 20))],
    [FileSpec("app/config.json", data=b'{"lazy": true}\n'), FileSpec("tmp/scratch.txt", kind="whiteout"),
     FileSpec("app/current", kind="symlink", target="main.py")],
]

section("1. a loopback docker-registry")
registry = RegistryProcess(WORK / "registry")
registry.start()
remember_pid(registry.pid)
print(f"registry at {registry.url}")

section("2. a 3-layer eStargz image built by ctr-remote (private containerd) and pushed")
containerd = Containerd(WORK / "containerd")
containerd.start()
try:
    image = build_image(containerd, registry, "demo/app:esgz", LAYERS, compression="gzip")
finally:
    containerd.stop()
print(f"image {image.ref}")
for index, layer in enumerate(image.layers):
    print(f"  layer {index}: {layer.digest} {layer.size} bytes, toc.digest {layer.toc_digest}")

section("3. a nydus-snapshotter root: metadata.db written by containerd's snapshots/storage")
snapdb = Snapdb(build_snapdb(WORK / "snapdb-build"))
root = WORK / "root"
root.mkdir()
ops, parent = [], ""
for index, layer in enumerate(image.layers):
    name = f"sha256:demo-chain-{index}"
    key = f"k8s.io/{index}/extract {name}"
    ops.append({"op": "active", "key": key, "parent": parent, "labels": {"containerd.io/snapshot.ref": name}})
    ops.append({"op": "commit", "key": key, "name": name, "labels": {
        "containerd.io/snapshot/cri.image-ref": image.ref,
        "containerd.io/snapshot/cri.layer-digest": layer.digest,
        "containerd.io/snapshot/stargz/toc.digest": layer.toc_digest or "",
        "containerd.io/snapshot.ref": name}})
    parent = name
snapdb.apply(root / "metadata.db", [ops])
ids = {row["name"]: row["id"] for row in snapdb.list(root / "metadata.db")}
layer_ids = [ids[f"sha256:demo-chain-{index}"] for index in range(len(image.layers))]
for snapshot_id in layer_ids:
    (root / "snapshots" / snapshot_id / "fs").mkdir(parents=True)
run(BIN / "stargzfs", "status", root)

section("4. mount it")
mnt = WORK / "mnt"
mnt.mkdir()
out = subprocess.run([str(BIN / "stargzfs"), "mount", str(root), str(mnt), "--log-file", str(WORK / "daemon.log")],
                     text=True, capture_output=True, check=True)
print(f"$ stargzfs mount {root} {mnt} --log-file {WORK / 'daemon.log'}\n{out.stderr.strip()}")
remember_pid(int(out.stderr.split("daemon pid ")[1].split(")")[0]))
top = layer_ids[-1]
hexes = [layer.digest.split(":")[1] for layer in image.layers]

section("5. before: the mount lists each layer's bootstrap and image.boot; the real fs dirs are empty")
print("(names only: `ls -l` would stat them, and a stat is what triggers the conversion)")
for snapshot_id in layer_ids:
    run("ls", "-1", "--color=never", mnt / snapshot_id)
run("ls", "-la", *(root / "snapshots" / snapshot_id / "fs" for snapshot_id in layer_ids))

section("6. stat of <hex> converts that one layer (TOC fetched with one ranged GET, then the builder)")
started = time.monotonic()
run("stat", "-c", "%n: %s bytes, mode %a", mnt / layer_ids[0] / hexes[0])
print(f"(first lookup took {time.monotonic() - started:.2f}s)")
run("ls", "-l", root / "snapshots" / layer_ids[0] / "fs", root / "cache")

section("7. opening image.boot converts the rest of the chain in parallel and merges it base-first")
started = time.monotonic()
with open(mnt / top / "image.boot", "rb") as handle:
    size = len(handle.read())
print(f"read {size} bytes of {mnt / top / 'image.boot'} in {time.monotonic() - started:.2f}s")
for snapshot_id in layer_ids:
    run("ls", "-l", root / "snapshots" / snapshot_id / "fs")
run(BIN / "stargzfs", "status", root)

section("8. stargzfs-image inspect of the merged image.boot")
boot = root / "snapshots" / top / "fs" / "image.boot"
run(BIN / "stargzfs-image", "inspect", boot, "stats")
run(BIN / "stargzfs-image", "inspect", boot, "blobs")
run(BIN / "stargzfs-image", "inspect", boot, "ls", "/app")

section("9. stargzfs mount-image: the kernel's erofs over blobs the mount fetches on demand")
image_root = WORK / "image"
image_root.mkdir()
run(BIN / "stargzfs", "mount-image", mnt, top, image_root)
try:
    run("ls", "-l", mnt / ".blobs")
    print("(each layer blob as a file; its bytes come from the registry only when the kernel reads them)")
    run("find", image_root, "-printf", "%M %10s %p\n")
    run("cat", image_root / "etc" / "os-release", image_root / "app" / "config.json")
    run("ls", "-l", image_root / "tmp")
    print("(tmp/scratch.txt is gone: the top layer's whiteout was applied by the merge)")
    run(BIN / "stargzfs", "status", root)
    print("(the blob lines: chunks fetched, verified against their TOC digests and cached in nydusd's"
          " blobcache layout in ROOT/cache, so a remount or a nydusd finds them ready)")
finally:
    run(BIN / "stargzfs", "umount", image_root)

section("11. clean up")
run(BIN / "stargzfs", "umount", mnt)
registry.stop()
print("demo finished")
PYTHON

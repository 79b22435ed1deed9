#!/usr/bin/env bash
# scripts/mount.sh ROOT MNT [stargzfs mount options...]
# Sets up apt packages + .venv if needed, mounts ROOT on MNT in the background,
# then prints how to look around and how to unmount.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: scripts/mount.sh ROOT MNT [--rw] [--fs-driver fusedev|fscache] [--log-file F] ..." >&2
  exit 2
fi
root=$(realpath -m "$1"); mnt=$(realpath -m "$2"); shift 2
cd "$(dirname "$0")/.."
. scripts/setup.sh
mkdir -p "$mnt"
.venv/bin/stargzfs mount "$root" "$mnt" "$@"
cat <<MSG
stargzfs is serving $root on $mnt
  look:     ls -l $mnt            # one dir per snapshot id in $root/metadata.db
            ls -l $mnt/<id>/      # = $root/snapshots/<id>/fs/
  an image: $(pwd)/.venv/bin/stargzfs mount-image $mnt <top id> TARGET
            # TARGET shows the image's root filesystem on the kernel's erofs; its files'
            # bytes are fetched from the registry when first read (MNT/.blobs/<hex>)
            $(pwd)/.venv/bin/stargzfs umount TARGET
  unmount:  $(pwd)/.venv/bin/stargzfs umount $mnt   (or: fusermount3 -u $mnt)
MSG

#!/usr/bin/env bash
# Detach a kernel NBD device attached with nbd-attach.sh: unmount it first.
#   scripts/nbd-detach.sh /dev/nbdN
set -euo pipefail
dev=${1:?usage: nbd-detach.sh /dev/nbdN}
if grep -q "^$dev " /proc/mounts; then
  echo "nbd-detach: $dev is mounted; umount it first" >&2
  exit 1
fi
nbd-client -d "$dev"

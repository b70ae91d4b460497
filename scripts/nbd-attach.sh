#!/usr/bin/env bash
# Attach a cowbd export as a kernel block device.
#   scripts/nbd-attach.sh EXPORT [/dev/nbdN] [HOST] [PORT] [extra nbd-client args...]
# Needs root, the nbd module (modprobe nbd) and nbd-client.
set -euo pipefail
export_name=${1:?usage: nbd-attach.sh EXPORT [/dev/nbdN] [HOST] [PORT]}
dev=${2:-}
host=${3:-127.0.0.1}
port=${4:-10809}
shift $(( $# < 4 ? $# : 4 ))
modprobe nbd 2>/dev/null || true
if [ -z "$dev" ]; then
  # The first device with no size is free.
  for d in /sys/block/nbd*; do
    if [ "$(cat "$d/size")" = 0 ]; then dev=/dev/$(basename "$d"); break; fi
  done
fi
[ -n "$dev" ] || { echo "nbd-attach: no free /dev/nbdN (modprobe nbd nbds_max=16?)" >&2; exit 1; }
nbd-client "$host" "$port" "$dev" -N "$export_name" -b 4096 "$@"
echo "$dev"

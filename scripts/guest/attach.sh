#!/bin/sh
# cowbd-attach DEVICE: (re)attaches DEVICE to its export as listed in /cowbd/exports,
# so a guest script can disconnect and reattach to prove data came from the server.
dev=$1
line=$(awk -v d="$dev" '$2 == d' /cowbd/exports)
[ -n "$line" ] || { echo "cowbd-attach: $dev is not in /cowbd/exports" >&2; exit 2; }
set -- $line
port=$1 name=$3 conns=$4 tmo=$5
set -- 10.0.2.2 "$port" "$dev" -t "$tmo"
[ "$name" = - ] || set -- "$@" -N "$name"
[ "$conns" -gt 1 ] && set -- "$@" -C "$conns"
# Right after a disconnect the kernel may still be tearing the device down.
i=0
while :; do
  echo "cowbd-attach: nbd-client $*"
  timeout "$tmo" nbd-client "$@" </dev/null && exit 0
  rc=$?
  i=$((i + 1))
  [ $i -lt 5 ] || { echo "cowbd-attach: $dev failed: nbd-client exit $rc" >&2; exit "$rc"; }
  sleep 1
done

#!/bin/busybox sh
# PID 1 of the kernel-test guest. The per-run part of the initramfs (appended by
# test/helpers/vm.ts) provides /cowbd/exports ("PORT DEVICE NAME CONNECTIONS
# TIMEOUT" per line, NAME "-" for the default export; see cowbd-attach) and
# /cowbd/script.sh.
# Everything ends with "COWBD-EXIT=<code>" on the console, which the host waits for:
#   the script's own exit code, or
#   240 an export did not attach, 241 a module did not load, 242 no network,
#   243 the script passed but a disconnect failed, 124 the guest's own deadline
#   (/cowbd/deadline seconds) passed.
export PATH=/sbin:/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu HOME=/root
mount -t devtmpfs devtmpfs /dev
# The kernel may have started us without a console; make sure we print to it.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "COWBD-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"

finish() {
  echo "COWBD-EXIT=$1"
  sync
  poweroff -f
  # poweroff -f does not return; if it ever does, end with the panic=-1 reboot,
  # which qemu's -no-reboot turns into an exit.
  exit "$1"
}

if [ -f /cowbd/deadline ]; then
  (sleep "$(cat /cowbd/deadline)"; echo "COWBD: guest deadline passed"; finish 124) &
fi

while read -r m; do
  insmod "$m" || { echo "COWBD: insmod $m failed"; finish 241; }
done </etc/cowbd-modules

i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 ||
  { echo "COWBD: network setup failed"; ip addr; finish 242; }

DEVICES=$(awk '{ print $2 }' /cowbd/exports 2>/dev/null)
for dev in $DEVICES; do
  cowbd-attach "$dev" || { echo "COWBD: attach $dev failed"; finish 240; }
done
echo "COWBD-ATTACHED uptime=$(cut -d' ' -f1 /proc/uptime)"

cd /root
# Each traced command carries the guest uptime, to see which step is slow.
export PS4='+ [$(cut -d" " -f1 /proc/uptime)] '
sh -ex /cowbd/script.sh </dev/null
rc=$?
echo "COWBD-SCRIPT-DONE rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"

sync
for dev in $DEVICES; do
  grep -q "^$dev " /proc/mounts && umount "$dev"
  # The script may have disconnected it already; size 0 means not connected.
  [ "$(cat "/sys/block/${dev#/dev/}/size" 2>/dev/null)" = 0 ] && continue
  nbd-client -d "$dev" || { echo "COWBD: disconnect $dev failed"; [ "$rc" = 0 ] && rc=243; }
done
finish "$rc"

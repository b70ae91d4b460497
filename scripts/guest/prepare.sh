#!/usr/bin/env bash
# Prepares the QEMU guest that the kernel tests boot: a stock Debian kernel and a
# small initramfs holding nbd.ko, virtio-net, ext4, busybox, nbd-client and
# e2fsprogs. Nothing is installed on the host; packages are fetched with
# `apt-get download` and unpacked with `dpkg -x` into the cache directory.
#
# Cache: ${COWBD_GUEST_CACHE:-$HOME/.cache/cowbd-guest}, holding `kernel` (an
# uncompressed ELF when possible), `initramfs.img`, the .debs, and stamps keyed by
# the package versions and this folder's scripts: a warm run costs milliseconds
# while apt's lists are unchanged, and a few apt-cache calls when they changed.
#
# Exit 0: ready (last stdout line is the cache directory). Exit 77: this host
# cannot prepare or boot a guest; the reason is on stderr and tests skip.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${COWBD_GUEST_CACHE:-$HOME/.cache/cowbd-guest}
ARCH=x86_64-linux-gnu

skip() { echo "guest-prepare: cannot prepare: $*" >&2; exit 77; }
log() { echo "guest-prepare: $*" >&2; }

for tool in qemu-system-x86_64 apt-get apt-cache dpkg dpkg-deb depmod cpio gzip ldd flock; do
  command -v "$tool" >/dev/null 2>&1 || skip "'$tool' not found (install qemu-system-x86, kmod, cpio)"
done

mkdir -p "$CACHE"
# Test files run in parallel and each calls this; only one may build.
exec 9>"$CACHE/.lock"
flock 9

# apt-cache is slow here (about 1.5 s a call: Docker-style images disable its
# binary cache), so every query below is batched.
versions() {  # prints "pkg=candidate-version" for each argument
  apt-cache show --no-all-versions "$@" 2>/dev/null | awk '/^Package: / { p = $2 } /^Version: / { print p "=" $2 }'
}
# The package lists and our scripts are all that can change what we would build:
# while they are unchanged, a cached build is reused without asking apt at all.
LISTS_SIG=$( { ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null; cat "$HERE"/*.sh; } | sha256sum | cut -d' ' -f1)
cached() { [ -f "$CACHE/kernel" ] && [ -f "$CACHE/initramfs.img" ] && [ -f "$CACHE/$1" ] && [ "$(cat "$CACHE/$1")" = "$2" ]; }
if cached lists-stamp "$LISTS_SIG"; then echo "$CACHE"; exit 0; fi

if [ -z "$(versions linux-image-amd64)" ]; then
  [ "$(id -u)" = 0 ] || skip "apt has no package lists and we are not root to run apt-get update"
  log "apt-get update (no package lists)"
  apt-get update -q >&2 || skip "apt-get update failed"
  LISTS_SIG=$( { ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null; cat "$HERE"/*.sh; } | sha256sum | cut -d' ' -f1)
fi

# Walks Depends/PreDepends from the given packages, following lib* packages only.
# libc6 and what it pulls in come from the host (same release), so they are left out.
# Sets KPKG (the kernel package linux-image-amd64 depends on) and LIBS.
KPKG=
resolve() {
  local -A seen=()
  local frontier=("$@") next d
  while [ ${#frontier[@]} -gt 0 ]; do
    next=()
    while read -r owner d; do
      if [ "$owner" = linux-image-amd64 ]; then KPKG=${KPKG:-$d}; continue; fi
      case $d in libc6|libgcc-s1|libcrypt1|"") continue ;; esac
      [ -n "${seen[$d]:-}" ] && continue
      seen[$d]=1; next+=("$d")
    done < <(apt-cache depends "${frontier[@]}" 2>/dev/null | awk '
      /^[^ ]/ { owner = $1; next }
      ($1 ~ /^\|?(Pre)?Depends:$/) && (($2 ~ /^lib/) || (owner == "linux-image-amd64" && $2 ~ /^linux-image-/)) { print owner, $2 }')
    frontier=("${next[@]}")
  done
  LIBS=($(printf '%s\n' "${!seen[@]}" | sort))
}
LIBS=()
resolve linux-image-amd64 nbd-client e2fsprogs
[ -n "$KPKG" ] || skip "cannot resolve the kernel package that linux-image-amd64 depends on"
TOOLS=(nbd-client busybox-static e2fsprogs)
PKGS=("$KPKG" "${TOOLS[@]}" "${LIBS[@]}")
VERSIONS=$(versions "${PKGS[@]}" | sort)
KEY=$( { echo "$VERSIONS"; cat "$HERE"/*.sh; } | sha256sum | cut -d' ' -f1)
if cached stamp "$KEY"; then
  echo "$LISTS_SIG" >"$CACHE/lists-stamp"
  echo "$CACHE"
  exit 0
fi

log "building guest in $CACHE (kernel package $KPKG)"
start=$(date +%s)
BUILD=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
DEBS=$BUILD/debs U=$BUILD/unpack S=$BUILD/initramfs
mkdir -p "$DEBS" "$U" "$S"

# A warm apt cache already holds some of these; apt-get download then skips them.
while IFS== read -r p v; do
  v=${v//:/%3a}
  for f in /var/cache/apt/archives/"${p}_${v}"_*.deb "$CACHE"/debs/"${p}_${v}"_*.deb; do
    [ -f "$f" ] && cp -n "$f" "$DEBS/" && break
  done
done <<<"$VERSIONS"
fetch() { (cd "$DEBS" && apt-get download -q "${PKGS[@]}" >&2 2>"$BUILD/download.err"); }
if ! fetch; then
  cat "$BUILD/download.err" >&2
  [ "$(id -u)" = 0 ] || skip "apt-get download failed and we are not root to run apt-get update"
  log "apt-get download failed; apt-get update and retry"
  apt-get update -q >&2 || skip "apt-get update failed"
  fetch || { cat "$BUILD/download.err" >&2; skip "apt-get download ${PKGS[*]} failed"; }
fi
# Keep only what this key needs, so the download cache does not grow forever.
rm -rf "$CACHE/debs" && cp -r "$DEBS" "$CACHE/debs"

for deb in "$DEBS"/*.deb; do dpkg -x "$deb" "$U"; done

KVER=${KPKG#linux-image-}
[ -d "$U/lib/modules/$KVER" ] || { echo "guest-prepare: $KPKG has no lib/modules/$KVER" >&2; exit 1; }
depmod -b "$U" "$KVER"

mkdir -p "$S"/{bin,sbin,dev,proc,sys,tmp,run,mnt,root,etc,var,lib/$ARCH,lib64}

# Modules in load order: each module's modules.dep line lists its whole
# dependency closure, deepest last, so loading that list reversed works.
MODDIR=$U/lib/modules/$KVER
declare -A DEPS=() PATHOF=() LOADED=()
while IFS= read -r line; do
  mod=${line%%:*}; name=${mod##*/}; name=${name%.ko}; name=${name//-/_}
  PATHOF[$name]=$mod; DEPS[$mod]=${line#*:}
done < "$MODDIR/modules.dep"
ORDER=()
load() {
  local mod=$1 deps d i
  [ -n "${LOADED[$mod]:-}" ] && return
  read -r -a deps <<<"${DEPS[$mod]}"
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do load "${deps[i]}"; done
  LOADED[$mod]=1; ORDER+=("$mod")
}
# crc32c: ext4 and jbd2 ask the crypto API for it at mount time, and there is no
# modprobe with aliases in the guest to load it on demand.
for name in virtio_pci virtio_net nbd crc32c_generic crc32c_intel ext4; do
  if [ -n "${PATHOF[$name]:-}" ]; then load "${PATHOF[$name]}"
  elif grep -q "/$name.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; then :
  else echo "guest-prepare: module $name not in $KPKG" >&2; exit 1
  fi
done
for mod in "${ORDER[@]}"; do
  install -D -m 0644 "$MODDIR/$mod" "$S/lib/modules/$KVER/$mod"
  echo "/lib/modules/$KVER/$mod" >>"$S/etc/cowbd-modules"
done
ln -s ../run "$S/var/run"
install -m 0755 "$U/bin/busybox" "$S/bin/busybox"
for a in $("$S/bin/busybox" --list); do
  [ "$a" = busybox ] || ln -sf busybox "$S/bin/$a"
done
# The real e2fsprogs and nbd-client go to /sbin, ahead of busybox's /bin in PATH.
install -m 0755 "$U/sbin/nbd-client" "$S/sbin/nbd-client"
for f in "$U"/sbin/* "$U"/usr/sbin/*; do
  case $(basename "$f") in mke2fs|mkfs.ext*|e2fsck|fsck.ext*|tune2fs|dumpe2fs|resize2fs|debugfs|e2label) cp -a "$f" "$S/sbin/" ;; esac
done
cp "$U/etc/mke2fs.conf" "$S/etc/mke2fs.conf"

# Copy every shared library the dynamic tools load; unpacked packages first, the host
# for libc. ldd runs them through the host's loader, which is the same release.
LDPATH=$U/lib/$ARCH:$U/usr/lib/$ARCH
declare -A COPIED=()
for f in "$S"/sbin/*; do
  [ -L "$f" ] && continue
  out=$(LD_LIBRARY_PATH=$LDPATH ldd "$f" 2>&1) || { echo "guest-prepare: ldd $f: $out" >&2; exit 1; }
  if grep -q 'not found' <<<"$out"; then echo "guest-prepare: $f: missing libraries:" >&2; grep 'not found' <<<"$out" >&2; exit 1; fi
  while read -r lib; do
    [ -n "${COPIED[$lib]:-}" ] && continue
    COPIED[$lib]=1
    if [[ $lib == */ld-linux-x86-64.so.2 ]]; then cp -L "$lib" "$S/lib64/ld-linux-x86-64.so.2"
    else cp -L "$lib" "$S/lib/$ARCH/$(basename "$lib")"
    fi
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$out")
done

install -m 0755 "$HERE/init.sh" "$S/init"
install -m 0755 "$HERE/attach.sh" "$S/sbin/cowbd-attach"
echo "$KVER" >"$S/etc/cowbd-kver"

(cd "$S" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$BUILD/initramfs.img"
# Under TCG the kernel's own XZ decompression costs seconds on every boot; qemu can
# boot the uncompressed ELF directly through its PVH entry point, so unpack it once.
# extract-vmlinux's method: the payload is the XZ stream inside the bzImage.
KIMG=$U/boot/vmlinuz-$KVER
unpack_kernel() (
  set +o pipefail  # head and xz stop reading early; their writers' SIGPIPE is fine
  grep -qx 'CONFIG_PVH=y' "$U/boot/config-$KVER" && command -v xz >/dev/null || return 1
  off=$(LC_ALL=C grep -abo $'\xfd7zXZ' "$KIMG" | head -n1 | cut -d: -f1)
  [ -n "$off" ] || return 1
  tail -c +$((off + 1)) "$KIMG" | xz -dc --single-stream >"$1" 2>/dev/null
  [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = 177ELF ]
)
if unpack_kernel "$BUILD/vmlinux"; then
  mv -f "$BUILD/vmlinux" "$CACHE/kernel"
else
  log "booting the compressed kernel (no PVH or not an XZ bzImage)"
  cp "$KIMG" "$CACHE/kernel"
fi
mv -f "$BUILD/initramfs.img" "$CACHE/initramfs.img"
echo "$KEY" >"$CACHE/stamp"
echo "$LISTS_SIG" >"$CACHE/lists-stamp"
log "built in $(($(date +%s) - start))s: kernel $KVER, initramfs $(du -h "$CACHE/initramfs.img" | cut -f1)"
echo "$CACHE"

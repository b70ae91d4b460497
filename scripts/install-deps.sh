#!/usr/bin/env bash
# Installs everything the test suite needs: Debian packages (as root, or through sudo
# for a user who has it) and npm packages (as the caller, so node_modules stays theirs).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(qemu-utils libnbd-bin python3-libnbd fio nbdkit nbd-server qemu-system-x86 kmod cpio xz-utils openssl restic prometheus)
# A one-node Ceph with its S3 gateway (scripts/ceph); its recommends would pull in far more than the daemons.
CEPH_PKGS=(ceph-mon ceph-osd radosgw ceph-common)
AS_ROOT=()
[ "$(id -u)" = 0 ] || AS_ROOT=(sudo)
if command -v apt-get >/dev/null && { [ ${#AS_ROOT[@]} = 0 ] || command -v sudo >/dev/null; }; then
  missing=()
  for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  missing_ceph=()
  for p in "${CEPH_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing_ceph+=("$p"); done
  if [ ${#missing[@]} -gt 0 ] || [ ${#missing_ceph[@]} -gt 0 ]; then
    "${AS_ROOT[@]}" apt-get update -q
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
  if [ ${#missing_ceph[@]} -gt 0 ]; then
    "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing_ceph[@]}"
  fi
else
  echo "install-deps: no apt-get, or not root and no sudo; skipping Debian packages (${PKGS[*]} ${CEPH_PKGS[*]})" >&2
fi
if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi

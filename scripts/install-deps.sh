#!/usr/bin/env bash
# Installs everything the test suite needs: Debian packages (as root, or through sudo
# for a user who has it) and npm packages (as the caller, so node_modules stays theirs).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(qemu-utils libnbd-bin python3-libnbd fio nbdkit nbd-server qemu-system-x86 kmod cpio xz-utils openssl restic prometheus)
AS_ROOT=()
[ "$(id -u)" = 0 ] || AS_ROOT=(sudo)
if command -v apt-get >/dev/null && { [ ${#AS_ROOT[@]} = 0 ] || command -v sudo >/dev/null; }; then
  missing=()
  for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    "${AS_ROOT[@]}" apt-get update -q
    "${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
else
  echo "install-deps: no apt-get, or not root and no sudo; skipping Debian packages (${PKGS[*]})" >&2
fi
if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi

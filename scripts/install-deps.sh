#!/usr/bin/env bash
# Installs everything the test suite needs: Debian packages (as root) and npm packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(qemu-utils libnbd-bin python3-libnbd fio nbdkit nbd-server qemu-system-x86 kmod cpio xz-utils openssl)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
else
  echo "install-deps: not root or no apt-get; skipping Debian packages (${PKGS[*]})" >&2
fi
if [ -f package-lock.json ]; then npm ci --no-audit --no-fund; else npm install --no-audit --no-fund; fi

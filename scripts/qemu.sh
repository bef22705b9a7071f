#!/usr/bin/env bash
# QEMU for the qemu provider's tests (nodepool-qemu) and `driver: qemu`:
# qemu-system-x86 from bookworm-backports, matching the preinstalled
# qemu-utils (bookworm's own 7.2 would replace qemu-img with an older build),
# and dosfstools + mtools for the config drives.
#
#   scripts/qemu.sh install   # installs what is missing (idempotent)
#
# scripts/test.sh runs `install` as a phase before the workspace tests; the
# tests fail (never skip) with the provider's error when QEMU is missing.
set -euo pipefail

log() { echo "qemu.sh: $*" >&2; }

BACKPORTS=/etc/apt/sources.list.d/bookworm-backports.list

have_all() {
  command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null \
    && command -v mcopy >/dev/null \
    && { command -v mkfs.vfat >/dev/null || [[ -x /usr/sbin/mkfs.vfat || -x /sbin/mkfs.vfat ]]; }
}

install_if_missing() {
  if have_all; then
    return
  fi
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  if [[ ! -f $BACKPORTS ]]; then
    log "adding $BACKPORTS"
    echo "deb http://deb.debian.org/debian bookworm-backports main" | $sudo tee "$BACKPORTS" >/dev/null
  fi
  log "installing qemu-system-x86 (bookworm-backports), dosfstools and mtools"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq -t bookworm-backports \
    --no-install-recommends qemu-system-x86 qemu-utils >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    dosfstools mtools >/dev/null
  have_all
}

case "${1:-}" in
  install) install_if_missing ;;
  *)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Chromium for the dashboard test (nodepool-cli/tests/dashboard.rs):
# Debian's `chromium` and `chromium-driver`, which the test drives through
# chromedriver's W3C WebDriver HTTP API.
#
#   scripts/chromium.sh install   # installs both when missing (idempotent)
#
# scripts/test.sh runs `install` as a phase before the workspace tests; the
# test fails (never skips) naming this script when either is missing.
set -euo pipefail

log() { echo "chromium.sh: $*" >&2; }

install_if_missing() {
  if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    return
  fi
  log "installing chromium and chromium-driver from Debian"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
  command -v chromium >/dev/null && command -v chromedriver >/dev/null
}

case "${1:-}" in
  install) install_if_missing ;;
  *)
    echo "usage: $0 install" >&2
    exit 2
    ;;
esac

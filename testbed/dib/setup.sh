#!/usr/bin/env bash
# Sets up a machine for real diskimage-builder builds (the `real-dib` test
# suite of nodepool-dib) and prints the variables those tests read:
#
#   eval "$(testbed/dib/setup.sh)"
#
# Idempotent and quiet on stdout except for the `export` lines; progress goes
# to stderr. Needs root (DIB uses loop devices, mount and chroot).
#
# What it does, from testbed/dib/README.md:
# - installs the Debian host packages DIB needs (only the missing ones);
#   `qemu-utils` is installed only when `qemu-img` is missing, so a newer
#   backport already on the machine is kept;
# - installs diskimage-builder from PyPI into a venv
#   (NODEPOOL_DIB_VENV, default /opt/nodepool-rs/dib-venv);
# - decides whether the device-mapper shims (shims/) are needed: they are on
#   kernels without device-mapper, where stock kpartx/dmsetup fail;
# - finds the Debian mirror apt uses (the only one reachable on CI machines)
#   in /etc/apt/sources.list{,.d}; DIB_DISTRIBUTION_MIRROR overrides it.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIB_VERSION=3.43.0
VENV=${NODEPOOL_DIB_VENV:-/opt/nodepool-rs/dib-venv}
STAMP="$VENV/.nodepool-rs-dib-$DIB_VERSION"

log() { echo "testbed/dib/setup.sh: $*" >&2; }
die() { log "$*"; exit 2; }

[[ $(id -u) == 0 ]] || die "run as root: diskimage-builder needs loop devices, mount and chroot"

# --- Debian host packages -------------------------------------------------
PACKAGES=(sudo debootstrap kpartx squashfs-tools dosfstools gdisk parted udev
  xz-utils zstd procps psmisc util-linux e2fsprogs python3-venv)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v qemu-img >/dev/null || missing+=(qemu-utils)
if (( ${#missing[@]} )); then
  log "installing from Debian: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || log "apt-get update failed; trying the install anyway"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
fi
for t in debootstrap qemu-img sgdisk partx losetup mkfs.ext4 mount umount chroot; do
  command -v "$t" >/dev/null || die "$t is still missing after the package install"
done

# --- diskimage-builder ----------------------------------------------------
if [[ ! -f $STAMP || ! -x $VENV/bin/disk-image-create ]]; then
  log "installing diskimage-builder==$DIB_VERSION into $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" >&2 || die "python3 -m venv $VENV failed"
  "$VENV/bin/pip" install -q --disable-pip-version-check "diskimage-builder==$DIB_VERSION" >&2 \
    || die "pip install diskimage-builder==$DIB_VERSION failed"
  touch "$STAMP"
fi

# --- device-mapper --------------------------------------------------------
# DIB's partitioning calls kpartx/dmsetup, which need device-mapper. Without
# it the shims make partition nodes with partx and symlink them into
# /dev/mapper; their pass-through sudo keeps PATH so the shims are found.
chmod +x "$HERE"/shims/* "$HERE"/elements/*/*.d/* 2>/dev/null || true
DIB_PATH=$VENV/bin:$PATH
if ! grep -qw device-mapper /proc/misc /proc/devices 2>/dev/null; then
  DIB_PATH=$HERE/shims:$DIB_PATH
  log "no device-mapper in this kernel: using the kpartx/dmsetup/sudo shims"
fi

# --- Debian mirror ----------------------------------------------------------
MIRROR=${DIB_DISTRIBUTION_MIRROR:-}
if [[ -z $MIRROR ]]; then
  MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
      /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -E '^[[:space:]]*(URIs:|deb )' \
    | grep -o -E 'https?://[^ ]+/debian/?' | head -1 || true)
  MIRROR=${MIRROR%/}
fi
[[ -n $MIRROR ]] || die "no Debian mirror found in /etc/apt/sources.list{,.d}; set DIB_DISTRIBUTION_MIRROR"
# The default security mirror is not reachable on CI machines: same host.
SECURITY=${DIB_DEBIAN_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}

q() { printf '%q' "$1"; }
echo "export NODEPOOL_TEST_DIB_CMD=$(q "$VENV/bin/disk-image-create")"
echo "export NODEPOOL_TEST_DIB_PATH=$(q "$DIB_PATH")"
echo "export NODEPOOL_TEST_DIB_ELEMENTS=$(q "$HERE/elements")"
echo "export NODEPOOL_TEST_DIB_MIRROR=$(q "$MIRROR")"
echo "export NODEPOOL_TEST_DIB_SECURITY_MIRROR=$(q "$SECURITY")"

#!/usr/bin/env bash
# Builds a bootable Debian qcow2 that takes root's SSH key and its hostname
# from an OpenStack config drive (glean), or reuses the cached one:
#
#   testbed/vm/build-image.sh OUTDIR      # prints the image path on stdout
#
# Elements: debian-minimal vm simple-init glean-ssh (testbed/dib/elements).
# The image is cached as OUTDIR/debian-glean-<key>.qcow2, where <key> hashes
# the elements given here, the content of testbed/dib/elements, the DIB,
# glean and pbr versions and the DIB_* settings below; a second run with the
# same key only prints the path. OUTDIR/debian-glean.qcow2 links to the
# newest build; older builds there are removed. Progress goes to stderr;
# the DIB log to OUTDIR/<name>.log.
# BUILD_IMAGE_CACHED_ONLY=1: exit 3 instead of building when not cached.
#
# Needs root (loop devices, mount, chroot). Runs testbed/dib/setup.sh
# (host packages, DIB venv, device-mapper shims, mirror).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DIB_DIR=$(cd "$HERE/../dib" && pwd)

log() { echo "testbed/vm/build-image.sh: $*" >&2; }
die() { log "$*"; exit 2; }

[[ $# == 1 ]] || die "usage: build-image.sh OUTDIR"
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
[[ $(id -u) == 0 ]] || die "run as root: diskimage-builder needs loop devices, mount and chroot"

ELEMENTS=(debian-minimal vm simple-init glean-ssh)
# Quick to boot: no boot menu wait (the serial console is the bootloader
# element's default).
export DIB_RELEASE=bookworm
export DIB_GRUB_TIMEOUT=0
# `quiet`: every console line costs time on the emulated 115200-baud serial
# port; systemd then prints only failures, glean and the login prompt.
export DIB_BOOTLOADER_DEFAULT_CMDLINE="nofb nomodeset gfxpayload=text quiet"
export DIB_CHECKSUM=0
export DIB_DEBOOTSTRAP_CACHE=1 DIB_DEBIAN_USE_DEBOOTSTRAP_CACHE=1
export DIB_APT_MINIMAL_CREATE_INTERFACES=0
# No git clone of glean (opendev.org is unreachable and the clone unused): see
# glean-repo-placeholder. glean itself: the wheels below.
export DIB_REPOTYPE_glean=file
export DIB_REPOLOCATION_glean=file://$HERE/glean-repo-placeholder
SETTINGS="DIB_RELEASE=$DIB_RELEASE DIB_GRUB_TIMEOUT=$DIB_GRUB_TIMEOUT DIB_BOOTLOADER_DEFAULT_CMDLINE=$DIB_BOOTLOADER_DEFAULT_CMDLINE DIB_APT_MINIMAL_CREATE_INTERFACES=$DIB_APT_MINIMAL_CREATE_INTERFACES"

t0=$(date +%s)
eval "$("$DIB_DIR/setup.sh")"

# glean and pbr are downloaded here, on the host, whose pip is configured for
# this network; pip in the chroot installs them offline (element glean-ssh).
export GLEAN_SSH_WHEELS=$OUTDIR/wheels
WHEELS=$("$HERE/glean-wheels.sh" "$GLEAN_SSH_WHEELS") || die "glean/pbr wheels missing"
DIB_VERSION=$(PATH=$NODEPOOL_TEST_DIB_PATH "$NODEPOOL_TEST_DIB_CMD" --version 2>/dev/null || echo unknown)

# --- cache key ----------------------------------------------------------
key=$( {
  echo "dib $DIB_VERSION $WHEELS"
  echo "elements ${ELEMENTS[*]}"
  echo "settings $SETTINGS"
  (cd "$DIB_DIR/elements" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  # modes matter too: a script that is not executable is not run
  (cd "$DIB_DIR/elements" && find . -type f -printf '%p %m\n' | LC_ALL=C sort)
} | sha256sum | cut -c1-16)
NAME=debian-glean-$key
IMAGE=$OUTDIR/$NAME.qcow2
if [[ -s $IMAGE ]]; then
  ln -sfn "$NAME.qcow2" "$OUTDIR/debian-glean.qcow2"
  log "cached: $IMAGE (key $key; $(( $(date +%s) - t0 )) s)"
  echo "$IMAGE"
  exit 0
fi

[[ ${BUILD_IMAGE_CACHED_ONLY:-0} == 1 ]] && { log "not cached: $IMAGE (BUILD_IMAGE_CACHED_ONLY=1)"; exit 3; }

# --- build --------------------------------------------------------------
# One build directory per run, so a failed or interrupted build can be swept
# without touching anybody else's /tmp/dib_* directories.
WORK=$(mktemp -d "$OUTDIR/.build-$key.XXXXXX")
DIB_PID=
sweep() {
  local rc=$?
  if [[ -n $DIB_PID ]] && kill -0 "$DIB_PID" 2>/dev/null; then
    kill -TERM "$DIB_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$DIB_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$DIB_PID" 2>/dev/null || true
  fi
  # mounts under WORK, deepest first
  awk -v w="$WORK" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  # loop devices backed by files under WORK
  losetup -nO NAME,BACK-FILE 2>/dev/null | while read -r dev back; do
    [[ $back == "$WORK"/* ]] || continue
    rm -f /dev/mapper/"$(basename "$dev")"p[0-9]*
    partx -d "$dev" 2>/dev/null || true
    losetup -d "$dev" 2>/dev/null || true
  done
  rm -rf "$WORK"
  exit "$rc"
}
trap sweep EXIT
trap 'exit 143' TERM INT

log "building $NAME (${ELEMENTS[*]}; DIB $DIB_VERSION); log: $OUTDIR/$NAME.log"
export DIB_DISTRIBUTION_MIRROR=$NODEPOOL_TEST_DIB_MIRROR
export DIB_DEBIAN_SECURITY_MIRROR=$NODEPOOL_TEST_DIB_SECURITY_MIRROR
export ELEMENTS_PATH=$NODEPOOL_TEST_DIB_ELEMENTS
export TMP_DIR=$WORK TMPDIR=$WORK
# The build directory is a tmpfs unless DIB_NO_TMPFS=1 (less memory, slower).
tmpfs_arg=()
[[ ${DIB_NO_TMPFS:-0} == 1 ]] && tmpfs_arg=(--no-tmpfs)
set +e
PATH=$NODEPOOL_TEST_DIB_PATH setsid "$NODEPOOL_TEST_DIB_CMD" "${tmpfs_arg[@]}" \
  -o "$WORK/$NAME" -t qcow2 "${ELEMENTS[@]}" >"$OUTDIR/$NAME.log" 2>&1 &
DIB_PID=$!
wait "$DIB_PID"
rc=$?
set -e
DIB_PID=
[[ $rc == 0 && -s $WORK/$NAME.qcow2 ]] ||
  die "disk-image-create failed (rc $rc); last lines of $OUTDIR/$NAME.log:$(echo; tail -n 20 "$OUTDIR/$NAME.log")"
mv "$WORK/$NAME.qcow2" "$IMAGE"
ln -sfn "$NAME.qcow2" "$OUTDIR/debian-glean.qcow2"
# One image per OUTDIR: older keys are stale (~400 MB each).
for old in "$OUTDIR"/debian-glean-*.qcow2; do
  [[ $old == "$IMAGE" ]] || rm -f "$old" "${old%.qcow2}.log"
done
log "built: $IMAGE ($(du -m "$IMAGE" | cut -f1) MB; $(( $(date +%s) - t0 )) s)"
echo "$IMAGE"

#!/usr/bin/env bash
# Downloads the glean and pbr wheels the glean-ssh element installs offline
# in the chroot (pip there cannot reach PyPI on these machines), unless DIR
# already has them:
#
#   testbed/vm/glean-wheels.sh DIR     # needs NODEPOOL_TEST_DIB_CMD (testbed/dib/setup.sh)
#
# Prints `glean VERSION pbr VERSION` on stdout (part of build-image.sh's
# cache key).
# Used by build-image.sh and scripts/test.d/50-vms.sh (whose builder runs
# DIB with GLEAN_SSH_WHEELS=DIR). Progress goes to stderr.
set -euo pipefail
GLEAN_VERSION=1.25.1 PBR_VERSION=7.1.3
DIR=${1:?usage: glean-wheels.sh DIR}
log() { echo "testbed/vm/glean-wheels.sh: $*" >&2; }
echo "glean $GLEAN_VERSION pbr $PBR_VERSION"
if ls "$DIR/glean-$GLEAN_VERSION-"*.whl "$DIR/pbr-$PBR_VERSION-"*.whl >/dev/null 2>&1; then
  exit 0
fi
: "${NODEPOOL_TEST_DIB_CMD:?run eval \"\$(testbed/dib/setup.sh)\" first}"
log "downloading glean $GLEAN_VERSION and pbr $PBR_VERSION wheels into $DIR"
rm -rf "$DIR"
"${NODEPOOL_TEST_DIB_CMD%/*}/pip" download -q --no-deps --only-binary=:all: -d "$DIR" \
  "glean==$GLEAN_VERSION" "pbr==$PBR_VERSION" >&2 || { log "pip download glean/pbr failed"; exit 2; }

#!/usr/bin/env bash
# The seeds' whole pipeline on real VMs (issue 14 part 5; the `real-vms`
# feature of nodepool-tests, tests/tests/vm_pipeline.rs): the
# nodepool-builder daemon builds a Debian image with diskimage-builder
# (debian-minimal vm simple-init glean-ssh), uploads it to a `driver: qemu`
# provider and boot-tests it; the nodepool-launcher daemon boots nodes from
# it under TCG with host-key checking and a ready script; `nodepool
# image-update` makes a setup-script snapshot of the image, and a node
# booted from it shows the setup's marker; a Zuul-style requestor and a
# Jenkins target each get a node, use it and give it back; nothing is left
# (no qemu process, overlay, snapshot, loop device or mount). ~8–10 min on
# a quiet 2-core machine, most of it the image build. Needs root.
#
#   bash scripts/test.d/50-vms.sh OUTPUT_FILE
#
# Installs what is missing first: the DIB testbed (testbed/dib/setup.sh:
# Debian packages, diskimage-builder in a venv, device-mapper shims,
# mirror), the glean/pbr wheels the glean-ssh element installs offline
# (testbed/vm/glean-wheels.sh), QEMU matching the installed qemu-utils and
# the config-drive tools (scripts/qemu.sh install), and the ssh client.
# ZooKeeper is the test command's (NODEPOOL_TEST_ZK_HOSTS). Every file of
# the run lives in a temporary directory under /var/tmp that the test
# removes; the wheels stay in /var/tmp/nodepool-vm/wheels (as for
# testbed/vm/build-image.sh). The image itself is built for real each
# run: only DIB's own debootstrap cache is reused between runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: 50-vms.sh OUTPUT_FILE}

fail() { echo "50-vms: $*" | tee "$OUT" >&2; exit 1; }

vars=$(testbed/dib/setup.sh) || fail "testbed/dib/setup.sh failed: the real-vms test cannot run"
eval "$vars"
WHEELS=/var/tmp/nodepool-vm/wheels
testbed/vm/glean-wheels.sh "$WHEELS" >/dev/null || fail "the glean/pbr wheels cannot be downloaded"
export NODEPOOL_TEST_GLEAN_WHEELS=$WHEELS
scripts/qemu.sh install || fail "QEMU cannot be installed (scripts/qemu.sh install)"
if ! command -v ssh >/dev/null || ! command -v ssh-keyscan >/dev/null; then
  apt-get install -y -qq openssh-client >/dev/null \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq openssh-client >/dev/null; } \
    || fail "openssh-client cannot be installed"
fi

# Built first, so the test's step timings do not include compiling (the test
# finds the daemons with `cargo build`, then a no-op).
cargo build -p nodepool-cli --locked --bin nodepool-builder --bin nodepool-launcher 2>&1 | tail -3
cargo test -p nodepool-tests --features real-vms --locked --test vm_pipeline --no-run 2>&1 | tail -3
# --nocapture: the test prints each step's time for BENCHMARKS.md.
cargo test -p nodepool-tests --features real-vms --locked --test vm_pipeline -- --nocapture 2>&1 | tee "$OUT"
exit "${PIPESTATUS[0]}"

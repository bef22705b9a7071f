#!/usr/bin/env bash
# Real diskimage-builder builds (the `real-dib` feature of nodepool-dib and of
# nodepool-tests): a build killed mid-way and checked to leave no mount, loop
# device or process (nodepool-dib's own test, ~2 min); then a small Debian
# image built through DibBuilder and checked (qcow2 + raw, ~3 min) and
# uploaded through the builder runtime (nodepool_core::builder) to two
# simulated clouds, one taking qcow2 and one raw, and to the real Glance of
# the OpenStack testbed, with the checksums the clouds computed compared to
# coreutils' (~30 s; a whole-system test, nodepool-tests' `real_dib`). Needs
# root.
#
#   bash scripts/test.d/40-dib.sh OUTPUT_FILE
#
# Sets up the DIB testbed first when missing (testbed/dib/setup.sh: Debian
# packages, diskimage-builder from PyPI in a venv, the device-mapper shims,
# the mirror apt uses), and starts the OpenStack testbed while the tests
# compile (testbed/openstack/lib.sh; stopped again if this script started
# it). Nothing is left running; the build's files live in a temporary
# directory removed by the tests.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: 40-dib.sh OUTPUT_FILE}
source testbed/openstack/lib.sh
trap testbed_down EXIT

if ! vars=$(testbed/dib/setup.sh); then
  echo "40-dib: testbed/dib/setup.sh failed: the real-dib tests cannot run" | tee "$OUT" >&2
  exit 1
fi
eval "$vars"

testbed_start_bg 40-dib || { echo "40-dib: the OpenStack testbed cannot be installed" | tee "$OUT" >&2; exit 1; }
cargo test -p nodepool-dib --features real-dib --locked --no-run 2>&1 | tail -3
cargo test -p nodepool-tests --features real-dib --locked --test real_dib --no-run 2>&1 | tail -3
testbed_wait || { echo "40-dib: the OpenStack testbed did not start" | tee "$OUT" >&2; exit 1; }

# --nocapture: the tests print the build's timings and memory for BENCHMARKS.md.
# One cargo command after the other: real builds share two cores and the
# debootstrap cache, so they never run at once.
cargo test -p nodepool-dib --features real-dib --locked -- --nocapture 2>&1 | tee "$OUT"
dib_rc=${PIPESTATUS[0]}
cargo test -p nodepool-tests --features real-dib --locked --test real_dib -- --nocapture 2>&1 | tee -a "$OUT"
system_rc=${PIPESTATUS[0]}
[[ $dib_rc == 0 && $system_rc == 0 ]]

#!/usr/bin/env bash
# The one command that runs every test of the project.
#
#   scripts/test.sh
#
# It installs and starts what the tests need when it is missing (ZooKeeper
# from Debian's packages; Python packages for interop tests into a local
# venv), runs the whole workspace's tests against those real servers, stops
# what it started, and prints one summary line. A test that needs a server
# fails (it never skips) when the server is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SUMMARY=()
FAILED=0
started_zk=0

cleanup() {
  if [[ $started_zk == 1 ]]; then scripts/zookeeper.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

phase() {
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name"
  if "$@"; then
    SUMMARY+=("$name: ok ($((SECONDS - t0)) s)")
  else
    SUMMARY+=("$name: FAILED ($((SECONDS - t0)) s)")
    FAILED=1
  fi
}

start_zookeeper() {
  scripts/zookeeper.sh start && started_zk=1 && eval "$(scripts/zookeeper.sh env)"
}

lint() {
  cargo fmt --all -- --check && cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
}

workspace_tests() {
  cargo test --workspace --all-features --locked --no-fail-fast 2>&1 | tee "$ROOT/target/test-output.txt"
  local rc=${PIPESTATUS[0]}
  local passed failed
  passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$ROOT/target/test-output.txt" | awk '{s+=$4} END {print s+0}')
  failed=$(grep -Eo '[0-9]+ failed' "$ROOT/target/test-output.txt" | awk '{s+=$1} END {print s+0}')
  SUMMARY+=("workspace tests: $passed passed, $failed failed")
  return "$rc"
}

mkdir -p target
phase "start ZooKeeper" start_zookeeper
phase "fmt + clippy" lint
phase "cargo test --workspace" workspace_tests

echo
echo "=== summary"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [[ $FAILED == 0 ]]; then echo "ALL PASSED"; else echo "SOME FAILED"; fi
exit $FAILED

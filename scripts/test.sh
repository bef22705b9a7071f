#!/usr/bin/env bash
# The one command that runs every test of the project.
#
#   scripts/test.sh
#
# It installs and starts what the tests need when it is missing (ZooKeeper
# and sshd from Debian's packages; the Python reference peers into a local venv;
# Chromium and chromedriver for the dashboard test),
# checks formatting and lints, builds and link-checks docs/, runs the whole
# workspace's tests against those real servers, then the slow real-service
# suites in scripts/test.d/ (each starts and stops its own service), stops
# what it started, and prints one summary. A test that needs a server fails
# (it never skips) when the server is missing.
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

# Debian's sshd for the static driver's tests (tests/src/sshd.rs starts
# private instances on 127.0.0.1; none runs as a service).
install_sshd() {
  [[ -x /usr/sbin/sshd ]] && return 0
  apt-get install -y openssh-server >/dev/null || { apt-get update >/dev/null && apt-get install -y openssh-server >/dev/null; }
  [[ -x /usr/sbin/sshd ]]
}

python_peers() {
  local vars
  vars=$(scripts/python-env.sh) && eval "$vars"
}

lint() {
  cargo fmt --all -- --check && cargo clippy --workspace --all-targets --all-features --locked -- -D warnings \
    && RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
}

# The operator documentation: docs/*.md rendered into target/docs, every
# relative link and #anchor resolved, docs/configuration.md equal to the
# parser's table. Builds only nodepool-docs and nodepool-model.
docs_site() {
  cargo run --quiet --locked -p nodepool-docs -- build
}

count_tests() {
  local file=$1 label=$2
  local passed failed
  passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$file" | awk '{s+=$4} END {print s+0}')
  failed=$(grep -Eo '; [0-9]+ failed' "$file" | awk '{s+=$2} END {print s+0}')
  SUMMARY+=("$label: $passed passed, $failed failed")
}

workspace_tests() {
  cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$ROOT/target/test-workspace.txt"
  local rc=${PIPESTATUS[0]}
  count_tests "$ROOT/target/test-workspace.txt" "workspace tests"
  [[ $rc == 0 ]] && return 0
  # A test that failed once is run once more, alone, and named in the
  # summary either way: a failure that does not repeat is reported as a
  # flake to fix, one that repeats fails the run. Build errors and doctests
  # (no "test NAME ... FAILED" line of a test binary) are not retried.
  local failed=()
  mapfile -t failed < <(sed -n 's/^test \([^ ]*\) \.\.\. FAILED$/\1/p' "$ROOT/target/test-workspace.txt" | sort -u)
  if [[ ${#failed[@]} == 0 || ${#failed[@]} -gt 5 ]]; then return "$rc"; fi
  echo "=== running once more: ${failed[*]}"
  cargo test --workspace --locked --no-fail-fast -- --exact "${failed[@]}" 2>&1 | tee "$ROOT/target/test-workspace-again.txt"
  local again=${PIPESTATUS[0]}
  local t
  for t in "${failed[@]}"; do
    if grep -q "^test $t \.\.\. FAILED$" "$ROOT/target/test-workspace-again.txt" || [[ $again != 0 ]]; then
      SUMMARY+=("  failed twice: $t")
    else
      SUMMARY+=("  FLAKY (failed once, passed when run again): $t")
    fi
  done
  return "$again"
}

mkdir -p target
export CARGO_TERM_COLOR=never
# Incremental caches are GBs a one-shot CI build never reuses.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
phase "start ZooKeeper" start_zookeeper
phase "python reference peers" python_peers
phase "install sshd" install_sshd
phase "install qemu" scripts/qemu.sh install
phase "chromium (dashboard test)" scripts/chromium.sh install
phase "fmt + clippy" lint
phase "docs" docs_site
phase "cargo test --workspace" workspace_tests
for suite in scripts/test.d/*.sh; do
  [[ -e "$suite" ]] || continue
  name=$(basename "$suite" .sh)
  phase "$name" bash "$suite" "$ROOT/target/test-$name.txt"
  [[ -f "$ROOT/target/test-$name.txt" ]] && count_tests "$ROOT/target/test-$name.txt" "$name tests"
done

echo
echo "=== summary"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [[ $FAILED == 0 ]]; then echo "ALL PASSED"; else echo "SOME FAILED"; fi
exit $FAILED

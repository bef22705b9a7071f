#!/usr/bin/env bash
# The OpenStack provider against a REAL OpenStack (testbed/openstack:
# Keystone, Glance, Placement, Nova with the fake virt driver, Neutron,
# MariaDB, RabbitMQ, all on 127.0.0.1).
#
#   bash scripts/test.d/30-openstack.sh OUTPUT_FILE
#
# Installs the testbed when missing (apt + pip, a few minutes, once per
# machine), starts it (about 130 s cold) while the tests compile, runs
# `cargo test -p nodepool-openstack --features testbed` with its output
# tee'd to OUTPUT_FILE, and stops and wipes the cloud again, also on
# failure. The cloud tests mostly wait on the cloud, so 6 run at once
# (within the 10-instance quota). A testbed that was already running is used and left running.
# Exits non-zero when anything failed.
set -uo pipefail
OUT=${1:-/dev/null}
cd "$(dirname "$0")/../.."
TB=testbed/openstack
V=${PEER_VENV:-/opt/openstack-testbed/venv}
P=${PEER_STATE:-/tmp/openstack-peer}
export NODEPOOL_TEST_CLOUDS_YAML=$P/clouds.yaml
started=0
t0=$SECONDS
log() { echo "30-openstack: [$((SECONDS - t0)) s] $*" >&2; }

cleanup() {
  if [[ $started == 1 ]]; then
    log "stopping the testbed"
    "$TB/stop.sh" --wipe > "$P.stop.log" 2>&1 || true
  fi
}
trap cleanup EXIT

if [[ ! -x $V/bin/nova-manage || ! -x $V/bin/keystone-manage || ! -x $V/bin/gunicorn ]] || ! command -v mariadbd > /dev/null \
   || [[ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
  log "installing the testbed (apt + pip)"
  "$TB/install.sh" > /tmp/openstack-testbed-install.log 2>&1 \
    || { tail -30 /tmp/openstack-testbed-install.log >&2; log "install failed"; exit 1; }
fi

already=0
if [[ -s $P/run/nova-api.pid ]] && kill -0 "$(cat "$P/run/nova-api.pid")" 2> /dev/null; then
  already=1
  log "testbed already running: using it and leaving it running"
fi
started=$((1 - already))
mkdir -p "$(dirname "$P")"
"$TB/start.sh" > "$P.start.log" 2>&1 &
start_pid=$!

# Compile while the cloud starts.
cargo test -p nodepool-openstack --features testbed --locked --no-run 2>&1 | tail -3
build_rc=${PIPESTATUS[0]}
wait "$start_pid"
start_rc=$?
cat "$P.start.log" >&2
if [[ $start_rc != 0 ]]; then
  log "the testbed did not start (see $P/log/)"
  exit 1
fi
[[ $build_rc == 0 ]] || { log "build failed"; exit 1; }
log "testbed up; running the tests"

cargo test -p nodepool-openstack --features testbed --locked --no-fail-fast -- --test-threads 6 2>&1 | tee "$OUT"
rc=${PIPESTATUS[0]}
log "tests done (exit $rc)"
exit "$rc"

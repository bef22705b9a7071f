# Sourced by the test phases that need the OpenStack testbed
# (scripts/test.d/30-openstack.sh, 40-dib.sh): install it when missing,
# start it unless it already runs, and stop it again only if we started it.
#
#   source testbed/openstack/lib.sh
#   testbed_up PHASE || exit 1      # blocks until the cloud answers
#   ...                             # NODEPOOL_TEST_CLOUDS_YAML is exported
#   testbed_down                    # (also from an EXIT trap)
#
# testbed_start_bg / testbed_wait split testbed_up so that a phase can
# compile while the cloud starts.
TB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_VENV=${PEER_VENV:-/opt/openstack-testbed/venv}
TB_STATE=${PEER_STATE:-/tmp/openstack-peer}
export NODEPOOL_TEST_CLOUDS_YAML=$TB_STATE/clouds.yaml
tb_started=0
tb_start_pid=

tb_log() { echo "$TB_PHASE: [$((SECONDS - TB_T0)) s] $*" >&2; }

testbed_installed() {
  [[ -x $TB_VENV/bin/nova-manage && -x $TB_VENV/bin/keystone-manage && -x $TB_VENV/bin/gunicorn ]] \
    && command -v mariadbd > /dev/null && [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]
}

testbed_running() {
  [[ -s $TB_STATE/run/nova-api.pid ]] && kill -0 "$(cat "$TB_STATE/run/nova-api.pid")" 2> /dev/null
}

testbed_start_bg() {
  TB_PHASE=$1
  TB_T0=$SECONDS
  if ! testbed_installed; then
    tb_log "installing the testbed (apt + pip)"
    "$TB_DIR/install.sh" > /tmp/openstack-testbed-install.log 2>&1 \
      || { tail -30 /tmp/openstack-testbed-install.log >&2; tb_log "install failed"; return 1; }
  fi
  if testbed_running; then
    tb_log "testbed already running: using it and leaving it running"
  else
    tb_started=1
  fi
  mkdir -p "$(dirname "$TB_STATE")"
  "$TB_DIR/start.sh" > "$TB_STATE.start.log" 2>&1 &
  tb_start_pid=$!
}

testbed_wait() {
  local rc=0
  wait "$tb_start_pid" || rc=$?
  cat "$TB_STATE.start.log" >&2
  if [[ $rc != 0 ]]; then
    tb_log "the testbed did not start (see $TB_STATE/log/)"
    return 1
  fi
  tb_log "testbed up"
}

testbed_up() { testbed_start_bg "$1" && testbed_wait; }

testbed_down() {
  if [[ $tb_started == 1 ]]; then
    tb_log "stopping the testbed"
    "$TB_DIR/stop.sh" --wipe > "$TB_STATE.stop.log" 2>&1 || true
    tb_started=0
  fi
}

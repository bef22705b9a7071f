#!/usr/bin/env bash
# Start a real OpenStack control plane (2026.2 release: keystone 30, glance 33,
# placement 16, nova 34 with the fake virt driver) on 127.0.0.1 only.
# Idempotent: anything already running (per its pid file) is left alone.
#
# Ports (all 127.0.0.1):
#   13306 MariaDB (private instance, socket $P/run/mysql.sock)
#   5672  RabbitMQ AMQP, 25672 Erlang distribution, 4369 epmd
#   5000  keystone  (identity v3)      9292 glance (image v2)
#   8778  placement                    8774 nova-api (compute v2.1)
#   9696  neutron API (ML2, no agents; PEER_NEUTRON=0 skips it, but then
#         nova GET /servers/ID and server delete fail: nova always asks neutron)
# Logs: /tmp/openstack-peer/log/   State: /tmp/openstack-peer/
# Credentials: admin / secret, project admin, domain Default (cloud "peer").
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
V=${PEER_VENV:-/opt/openstack-testbed/venv}
P=${PEER_STATE:-/tmp/openstack-peer}
E=$P/etc; L=$P/log; R=$P/run
PASS=secret
DBURL="mysql+pymysql://openstack:$PASS@127.0.0.1:13306"
RABBIT="rabbit://openstack:$PASS@127.0.0.1:5672/"
KS=http://127.0.0.1:5000
T0=$(date +%s.%N)
mkdir -p "$E" "$L" "$R"

say() { awk -v a="$(date +%s.%N)" -v b="$T0" -v m="$*" 'BEGIN { printf "[%6.1fs] %s\n", a - b, m }'; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_http() { # url seconds
  local i
  for i in $(seq "$2"); do curl -s -o /dev/null -m 2 "$1" && return 0; sleep 0.5; done
  echo "timeout waiting for $1" >&2; return 1
}
[ -x "$V/bin/python" ] || { echo "venv $V missing: run $HERE/install.sh" >&2; exit 1; }
command -v mariadbd >/dev/null || { echo "mariadb-server missing: run $HERE/install.sh" >&2; exit 1; }

# ---------------------------------------------------------------- MariaDB
if ! alive "$R/mysql.pid"; then
  if [ ! -d "$P/mysql-data/mysql" ]; then
    mkdir -p "$P/mysql-data"
    mariadb-install-db --no-defaults --user=root --datadir="$P/mysql-data" \
      --auth-root-authentication-method=normal --skip-test-db > "$L/mysql-install.log" 2>&1
  fi
  (cd "$P" && exec setsid mariadbd --no-defaults --user=root --datadir="$P/mysql-data" \
    --bind-address=127.0.0.1 --port=13306 --socket="$R/mysql.sock" \
    --pid-file="$R/mysql.pid" --log-error="$L/mysql.log" --skip-name-resolve \
    --innodb-buffer-pool-size=64M --max-connections=500 --performance-schema=OFF \
    --innodb-flush-log-at-trx-commit=2 --skip-log-bin) > /dev/null 2>&1 < /dev/null &
  for i in $(seq 60); do [ -S "$R/mysql.sock" ] && mariadb --no-defaults -S "$R/mysql.sock" -uroot -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
fi
mariadb --no-defaults -S "$R/mysql.sock" -uroot <<EOF
CREATE DATABASE IF NOT EXISTS keystone; CREATE DATABASE IF NOT EXISTS glance;
CREATE DATABASE IF NOT EXISTS placement; CREATE DATABASE IF NOT EXISTS nova_api;
CREATE DATABASE IF NOT EXISTS nova; CREATE DATABASE IF NOT EXISTS nova_cell0;
CREATE DATABASE IF NOT EXISTS neutron;
CREATE USER IF NOT EXISTS 'openstack'@'127.0.0.1' IDENTIFIED BY '$PASS';
CREATE USER IF NOT EXISTS 'openstack'@'localhost' IDENTIFIED BY '$PASS';
GRANT ALL PRIVILEGES ON *.* TO 'openstack'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO 'openstack'@'localhost';
EOF
say "mariadb up (127.0.0.1:13306)"

# --------------------------------------------------------------- RabbitMQ
RQ=$P/rabbitmq
mkdir -p "$RQ/home" "$RQ/mnesia" "$RQ/log"
cat > "$RQ/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:5672
loopback_users = none
default_user = openstack
default_pass = $PASS
EOF
echo '[].' > "$RQ/enabled_plugins"
rabbit_env() {
  export HOME=$RQ/home RABBITMQ_NODENAME=peer@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=5672 RABBITMQ_DIST_PORT=25672 ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=4369
  export RABBITMQ_CONFIG_FILE=$RQ/rabbitmq.conf RABBITMQ_MNESIA_BASE=$RQ/mnesia RABBITMQ_LOG_BASE=$RQ/log
  export RABBITMQ_PID_FILE=$RQ/rabbit.pid RABBITMQ_ENABLED_PLUGINS_FILE=$RQ/enabled_plugins
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}
if ! alive "$RQ/rabbit.pid"; then
  (rabbit_env; cd "$RQ" && exec setsid /usr/lib/rabbitmq/bin/rabbitmq-server) > "$L/rabbitmq.log" 2>&1 < /dev/null &
  for i in $(seq 120); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 0.5; done
  # epmd is started by the broker as a separate daemon; remember it for stop.sh
  ss -ltnpH 'sport = :4369' | grep -o 'epmd",pid=[0-9]*' | head -1 | grep -o '[0-9]*$' > "$R/epmd.pid" || true
fi
say "rabbitmq up (127.0.0.1:5672)"

# --------------------------------------------------------------- configs
AUTHTOKEN() { # user
cat <<EOF
[keystone_authtoken]
www_authenticate_uri = $KS
auth_url = $KS
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = $1
password = $PASS
service_token_roles_required = true
EOF
}
mkdir -p "$E/keystone" "$E/glance" "$E/placement" "$E/nova" "$P/glance/images" \
  "$P/glance/staging" "$P/glance/tasks" "$P/nova/instances" "$P/nova/lock"

cat > "$E/keystone/keystone.conf" <<EOF
[DEFAULT]
log_file = $L/keystone.log
[database]
connection = $DBURL/keystone
[token]
provider = fernet
[fernet_tokens]
key_repository = $E/keystone/fernet-keys
[fernet_receipts]
key_repository = $E/keystone/fernet-keys
[credential]
key_repository = $E/keystone/credential-keys
[cache]
enabled = false
EOF

cp "$V/etc/glance/glance-api-paste.ini" "$E/glance/glance-api-paste.ini"
{ cat <<EOF
[DEFAULT]
log_file = $L/glance.log
enabled_backends = fs:file
worker_self_reference_url = http://127.0.0.1:9292
[database]
connection = $DBURL/glance
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = $P/glance/images
[os_glance_staging_store]
filesystem_store_datadir = $P/glance/staging
[os_glance_tasks_store]
filesystem_store_datadir = $P/glance/tasks
[paste_deploy]
flavor = keystone
config_file = $E/glance/glance-api-paste.ini
[oslo_concurrency]
lock_path = $P/glance
EOF
AUTHTOKEN glance
# Glance only: no in-process token cache, so a revoked token is refused at
# once (the provider's re-authentication test revokes its own token and then
# lists images). The other services keep the 5-minute cache: validating every
# call in Keystone makes Nova several times slower on a busy machine.
echo "token_cache_time = -1"; } > "$E/glance/glance-api.conf"

{ cat <<EOF
[DEFAULT]
log_file = $L/placement.log
[placement_database]
connection = $DBURL/placement
[api]
auth_strategy = keystone
EOF
AUTHTOKEN placement; } > "$E/placement/placement.conf"

cp "$V/etc/nova/api-paste.ini" "$E/nova/api-paste.ini"
SVCAUTH() { # section
cat <<EOF
[$1]
auth_type = password
auth_url = $KS
project_domain_name = Default
user_domain_name = Default
project_name = service
username = nova
password = $PASS
region_name = RegionOne
EOF
}
{ cat <<EOF
[DEFAULT]
transport_url = $RABBIT
compute_driver = peer_virt.SnapshotFakeDriver
host = peer-compute
my_ip = 127.0.0.1
state_path = $P/nova
instances_path = $P/nova/instances
osapi_compute_listen = 127.0.0.1
metadata_listen = 127.0.0.1
osapi_compute_workers = 1
metadata_workers = 1
[api]
auth_strategy = keystone
[api_database]
connection = $DBURL/nova_api
[database]
connection = $DBURL/nova
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = 5
[wsgi]
api_paste_config = $E/nova/api-paste.ini
[oslo_concurrency]
lock_path = $P/nova/lock
[oslo_messaging_notifications]
driver = noop
[vnc]
enabled = false
[spice]
enabled = false
[serial_console]
enabled = false
[glance]
region_name = RegionOne
[service_user]
send_service_user_token = true
EOF
SVCAUTH placement | sed 's/^username = nova/username = placement/'
SVCAUTH neutron
SVCAUTH service_user | grep -v '^\[service_user\]'
AUTHTOKEN nova; } > "$E/nova/nova.conf"

if [ "${PEER_NEUTRON:-1}" = 1 ]; then
"$V/bin/python" -c 'import neutron_peer_mech' 2>/dev/null || \
  "$V/bin/pip" install -q --no-build-isolation --no-index "$HERE/neutron-peer-mech" >> "$L/setup.log" 2>&1
mkdir -p "$E/neutron/plugins/ml2" "$P/neutron/lock"
cp "$V/etc/neutron/api-paste.ini" "$E/neutron/api-paste.ini"
{ cat <<EOF
[DEFAULT]
log_file = $L/neutron.log
core_plugin = ml2
service_plugins = router
auth_strategy = keystone
transport_url = $RABBIT
state_path = $P/neutron
api_paste_config = $E/neutron/api-paste.ini
allow_overlapping_ips = true
notify_nova_on_port_status_changes = true
notify_nova_on_port_data_changes = true
dhcp_agent_notification = false
[database]
connection = $DBURL/neutron
[oslo_concurrency]
lock_path = $P/neutron/lock
[oslo_messaging_notifications]
driver = noop
EOF
AUTHTOKEN neutron
SVCAUTH nova | sed 's/^username = nova/username = neutron/'; } > "$E/neutron/neutron.conf"
cat > "$E/neutron/plugins/ml2/ml2_conf.ini" <<EOF
[ml2]
type_drivers = flat,vxlan
tenant_network_types = vxlan
mechanism_drivers = peer
extension_drivers = port_security
[ml2_type_flat]
flat_networks = public
[ml2_type_vxlan]
vni_ranges = 1:1000
EOF
fi

# --------------------------------------------------------------- keystone
KM="$V/bin/keystone-manage --config-file $E/keystone/keystone.conf"
if [ ! -f "$P/.keystone-ready" ]; then
  $KM db_sync >> "$L/setup.log" 2>&1
  [ -d "$E/keystone/fernet-keys" ] || $KM fernet_setup --keystone-user root --keystone-group root >> "$L/setup.log" 2>&1
  [ -d "$E/keystone/credential-keys" ] || $KM credential_setup --keystone-user root --keystone-group root >> "$L/setup.log" 2>&1
  $KM bootstrap --bootstrap-password $PASS --bootstrap-username admin \
    --bootstrap-project-name admin --bootstrap-role-name admin \
    --bootstrap-service-name keystone --bootstrap-region-id RegionOne \
    --bootstrap-admin-url $KS/v3/ --bootstrap-internal-url $KS/v3/ \
    --bootstrap-public-url $KS/v3/ >> "$L/setup.log" 2>&1
  touch "$P/.keystone-ready"
  say "keystone db synced + bootstrapped"
fi

gunicorn_start() { # name port module env...
  local name=$1 port=$2 mod=$3; shift 3
  alive "$R/$name.pid" && return 0
  (cd "$P" && exec env "$@" setsid "$V/bin/gunicorn" --chdir "$HERE/wsgi" \
     --no-control-socket --workers 1 --threads 8 --bind "127.0.0.1:$port" \
     --pid "$R/$name.pid" --name "$name" --timeout 300 --graceful-timeout 5 \
     "$mod:application") >> "$L/$name-wsgi.log" 2>&1 < /dev/null &
  echo $! > "$R/$name.pid"   # gunicorn rewrites it with the same master pid
}
daemon_start() { # name cmd...
  local name=$1; shift
  alive "$R/$name.pid" && return 0
  (cd "$P" && exec setsid "$@") >> "$L/$name.out" 2>&1 < /dev/null &
  echo $! > "$R/$name.pid"
}

gunicorn_start keystone 5000 keystone_app OS_KEYSTONE_CONFIG_FILES="$E/keystone/keystone.conf"
wait_http $KS/v3 120
say "keystone up ($KS/v3)"

WANT="glance placement nova"
[ "${PEER_NEUTRON:-1}" = 1 ] && WANT="$WANT neutron"
if [ ! -f "$P/.registered" ] || [ "$(cat "$P/.registered")" != "$WANT" ]; then
  OS_PASSWORD=$PASS "$V/bin/python" "$HERE/register.py" $WANT >> "$L/setup.log" 2>&1
  echo "$WANT" > "$P/.registered"
  say "service users + catalog registered: $WANT"
fi

# --------------------------------------------------------------- glance
if [ ! -f "$P/.glance-ready" ]; then
  "$V/bin/glance-manage" --config-file "$E/glance/glance-api.conf" db_sync >> "$L/setup.log" 2>&1
  touch "$P/.glance-ready"; say "glance db synced"
fi
gunicorn_start glance 9292 glance_app OS_GLANCE_CONFIG_DIR="$E/glance"

# --------------------------------------------------------------- placement
if [ ! -f "$P/.placement-ready" ]; then
  "$V/bin/placement-manage" --config-file "$E/placement/placement.conf" db sync >> "$L/setup.log" 2>&1
  touch "$P/.placement-ready"; say "placement db synced"
fi
gunicorn_start placement 8778 placement_app OS_PLACEMENT_CONFIG_DIR="$E/placement"

# --------------------------------------------------------------- neutron
if [ "${PEER_NEUTRON:-1}" = 1 ]; then
  NC=(--config-file "$E/neutron/neutron.conf" --config-file "$E/neutron/plugins/ml2/ml2_conf.ini")
  if [ ! -f "$P/.neutron-ready" ]; then
    "$V/bin/neutron-db-manage" "${NC[@]}" upgrade heads >> "$L/setup.log" 2>&1
    touch "$P/.neutron-ready"; say "neutron db synced"
  fi
  gunicorn_start neutron 9696 neutron_app OS_NEUTRON_CONFIG_DIR="$E/neutron" \
    OS_NEUTRON_CONFIG_FILES="neutron.conf;plugins/ml2/ml2_conf.ini"
fi

# --------------------------------------------------------------- nova
NM="$V/bin/nova-manage --config-file $E/nova/nova.conf"
if [ ! -f "$P/.nova-ready" ]; then
  $NM api_db sync >> "$L/setup.log" 2>&1
  $NM cell_v2 map_cell0 --database_connection "$DBURL/nova_cell0" >> "$L/setup.log" 2>&1
  $NM cell_v2 list_cells 2>/dev/null | grep ' cell1 ' >/dev/null || \
    $NM cell_v2 create_cell --name cell1 >> "$L/setup.log" 2>&1
  $NM db sync >> "$L/setup.log" 2>&1
  touch "$P/.nova-ready"; say "nova api_db/cell0/cell1 synced"
fi
gunicorn_start nova-api 8774 nova_app OS_NOVA_CONFIG_DIR="$E/nova"
NOVA_COMMON=(--config-file "$E/nova/nova.conf")
daemon_start nova-conductor "$V/bin/nova-conductor" "${NOVA_COMMON[@]}" --log-file "$L/nova-conductor.log"
daemon_start nova-scheduler "$V/bin/nova-scheduler" "${NOVA_COMMON[@]}" --log-file "$L/nova-scheduler.log"
# peer_virt.SnapshotFakeDriver: the fake driver, with snapshots that upload
# data. Nova loads drivers from its own package only (nova.virt.<name>), so
# the module is copied there (again whenever it changed).
VIRT=$("$V/bin/python" -c 'import nova.virt, os; print(os.path.dirname(nova.virt.__file__))')
cmp -s "$HERE/nova-peer-virt/peer_virt.py" "$VIRT/peer_virt.py" || cp "$HERE/nova-peer-virt/peer_virt.py" "$VIRT/peer_virt.py"
daemon_start nova-compute "$V/bin/nova-compute" "${NOVA_COMMON[@]}" --log-file "$L/nova-compute.log"

wait_http http://127.0.0.1:9292/ 120; say "glance up (http://127.0.0.1:9292)"
wait_http http://127.0.0.1:8778/ 120; say "placement up (http://127.0.0.1:8778)"
wait_http http://127.0.0.1:8774/ 180; say "nova-api up (http://127.0.0.1:8774/v2.1)"
if [ "${PEER_NEUTRON:-1}" = 1 ]; then wait_http http://127.0.0.1:9696/ 180; say "neutron up (http://127.0.0.1:9696)"; fi

# wait until the fake compute node is registered in placement and mapped to cell1
for i in $(seq 120); do
  if $NM cell_v2 discover_hosts >/dev/null 2>&1 && \
     $NM cell_v2 list_hosts 2>/dev/null | grep peer-compute >/dev/null; then break; fi
  sleep 1
done
$NM cell_v2 list_hosts 2>/dev/null | grep peer-compute >/dev/null && say "nova-compute (fake driver) registered + mapped" \
  || say "WARNING: nova-compute not mapped yet; see $L/nova-compute.log"

# --------------------------------------------------------------- seed
# What an operator would have set up for nodepool: flavors, a bootable
# image, an external and a tenant network with a router, and a second
# project with a one-instance quota (see seed.py). Idempotent.
OS_PASSWORD=$PASS "$V/bin/python" "$HERE/seed.py" >> "$L/setup.log" 2>&1 || {
  echo "seed.py failed; see $L/setup.log" >&2; tail -20 "$L/setup.log" >&2; exit 1; }
say "seeded (flavors np.*, image np-base, networks public/private, project np-quota)"

# --------------------------------------------------------------- clouds.yaml
cat > "$P/clouds.yaml" <<EOF
# written by start.sh
clouds:
  peer:
    auth:
      auth_url: $KS/v3
      username: admin
      password: $PASS
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    identity_api_version: 3
    interface: public
  peer-quota:
    auth:
      auth_url: $KS/v3
      username: np-quota
      password: $PASS
      project_name: np-quota
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    identity_api_version: 3
EOF
say "all up; clouds.yaml at $P/clouds.yaml (clouds: peer, peer-quota)"

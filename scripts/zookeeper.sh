#!/usr/bin/env bash
# ZooKeeper for the test suites: Debian's `zookeeper` package, on 127.0.0.1
# only, with a plaintext and a TLS listener and throw-away certificates.
#
#   scripts/zookeeper.sh start   # installs the package when missing, starts, waits until it answers
#   scripts/zookeeper.sh stop    # stops what `start` started (by pid file) and wipes its data
#   scripts/zookeeper.sh env     # prints the NODEPOOL_TEST_ZK_* variables the tests read
#   scripts/zookeeper.sh run     # prepares as `start` does, then runs ZooKeeper in the foreground
#
# `run` is for a harness that owns the server process (the fault drills of
# tests/src/faults.rs): it `exec`s java, so the harness's child *is* the
# server, which it stops, starts again on the same data directory (sessions
# survive a short restart) and kills when the test ends. Point ZK_PORT,
# ZK_TLS_PORT and ZK_BASE at free ports and a private directory: the shared
# server must never be stopped, other tests use it.
#
# Ports: ZK_PORT (default 22181) and ZK_TLS_PORT (default ZK_PORT+100).
# State: ZK_BASE (default ${TMPDIR:-/tmp}/nodepool-rs-zk-$ZK_PORT).
#
# Ensemble member (for `run`): ZK_ENSEMBLE lists every member as
# `ID=QUORUM_PORT:ELECTION_PORT` separated by spaces (all on 127.0.0.1) and
# ZK_MYID says which one this is; the server then runs as a quorum peer.
# Members share one certificate directory when ZK_CERTS names it.
set -euo pipefail
ZK_PORT="${ZK_PORT:-22181}"
ZK_TLS_PORT="${ZK_TLS_PORT:-$((ZK_PORT + 100))}"
ZK_BASE="${ZK_BASE:-${TMPDIR:-/tmp}/nodepool-rs-zk-$ZK_PORT}"
CERTS="${ZK_CERTS:-$ZK_BASE/certs}"
ZK_ENSEMBLE="${ZK_ENSEMBLE:-}"
ZK_MYID="${ZK_MYID:-}"
PIDFILE="$ZK_BASE/zk.pid"

log() { echo "zookeeper.sh: $*" >&2; }

install_if_missing() {
  if [[ -f /usr/share/java/zookeeper.jar ]] && command -v java >/dev/null && command -v openssl >/dev/null; then
    return
  fi
  log "installing zookeeper and openssl from Debian"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq zookeeper openssl >/dev/null
}

gen_certs() {
  [[ -f "$CERTS/ca.pem" && -f "$CERTS/client.pem" && -f "$CERTS/server-keystore.pem" ]] && return
  mkdir -p "$CERTS"
  (
    cd "$CERTS"
    local san="subjectAltName=DNS:localhost,IP:127.0.0.1"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=nodepool-rs-test-ca" \
      -keyout ca.key -out ca.pem 2>/dev/null
    for who in server client; do
      openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$who.key" -out "$who.csr" 2>/dev/null
      printf '%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' \
        "$san" > "$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$who.ext" -out "$who.pem" 2>/dev/null
    done
    # ZooKeeper's PEM keystore wants the certificate and the key in one file.
    cat server.pem server.key > server-keystore.pem
    chmod 600 ./*.key server-keystore.pem
  )
}

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

ruok() {
  local r
  r=$( (exec 3<>"/dev/tcp/127.0.0.1/$ZK_PORT" && printf ruok >&3 && timeout 2 cat <&3) 2>/dev/null || true)
  [[ "$r" == "imok" ]]
}

# Installs when missing, makes the data directory, certificates and
# configuration, and sets JAVA_CMD to the server's command line.
prepare() {
  install_if_missing
  mkdir -p "$ZK_BASE/data"
  gen_certs
  cat > "$ZK_BASE/zoo.cfg" <<CFG
tickTime=500
minSessionTimeout=1000
maxSessionTimeout=60000
initLimit=10
syncLimit=5
dataDir=$ZK_BASE/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
secureClientPort=$ZK_TLS_PORT
secureClientPortAddress=127.0.0.1
serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory
ssl.keyStore.location=$CERTS/server-keystore.pem
ssl.keyStore.type=PEM
ssl.trustStore.location=$CERTS/ca.pem
ssl.trustStore.type=PEM
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,mntr,cons,dump
autopurge.snapRetainCount=3
autopurge.purgeInterval=1
CFG
  local main=org.apache.zookeeper.server.ZooKeeperServerMain
  if [[ -n "$ZK_ENSEMBLE" ]]; then
    [[ -n "$ZK_MYID" ]] || { log "ZK_ENSEMBLE needs ZK_MYID"; exit 2; }
    local member id ports
    for member in $ZK_ENSEMBLE; do
      id=${member%%=*}; ports=${member#*=}
      echo "server.$id=127.0.0.1:$ports" >> "$ZK_BASE/zoo.cfg"
    done
    echo "$ZK_MYID" > "$ZK_BASE/data/myid"
    main=org.apache.zookeeper.server.quorum.QuorumPeerMain
  fi
  cat > "$ZK_BASE/log4j.properties" <<L4J
log4j.rootLogger=WARN, F
log4j.appender.F=org.apache.log4j.FileAppender
log4j.appender.F.File=$ZK_BASE/zk.log
log4j.appender.F.layout=org.apache.log4j.PatternLayout
log4j.appender.F.layout.ConversionPattern=%d{ISO8601} - %-5p [%t:%C{1}@%L] - %m%n
L4J
  local cp="$ZK_BASE:/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-log4j12.jar:/usr/share/java/log4j-1.2.jar"
  # the Netty server (needed for TLS) wants these beside zookeeper.jar
  for j in netty-codec netty-resolver netty-transport-native-unix-common; do cp="$cp:/usr/share/java/$j.jar"; done
  JAVA_CMD=(java -Xmx512m -Dzookeeper.log.dir="$ZK_BASE" -Dlog4j.configuration="file:$ZK_BASE/log4j.properties"
    -Djava.net.preferIPv4Stack=true -cp "$cp" "$main" "$ZK_BASE/zoo.cfg")
}

start() {
  if running; then log "already running (pid $(cat "$PIDFILE"))"; return; fi
  prepare
  nohup "${JAVA_CMD[@]}" > "$ZK_BASE/zk.out" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 150); do
    if ! running; then log "exited; see $ZK_BASE/zk.out"; cat "$ZK_BASE/zk.out" >&2; exit 1; fi
    if ruok && echo | timeout 5 openssl s_client -connect "127.0.0.1:$ZK_TLS_PORT" -CAfile "$CERTS/ca.pem" \
        -cert "$CERTS/client.pem" -key "$CERTS/client.key" -verify_return_error >/dev/null 2>&1; then
      log "up on 127.0.0.1:$ZK_PORT (plain) and 127.0.0.1:$ZK_TLS_PORT (TLS), pid $(cat "$PIDFILE")"
      return
    fi
    sleep 0.2
  done
  log "did not answer within 30 s"; exit 1
}

stop() {
  if running; then
    local pid; pid=$(cat "$PIDFILE")
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    log "stopped (pid $pid)"
  fi
  rm -rf "$ZK_BASE"
}

env_vars() {
  echo "export NODEPOOL_TEST_ZK_HOSTS=127.0.0.1:$ZK_PORT"
  echo "export NODEPOOL_TEST_ZK_TLS_HOSTS=127.0.0.1:$ZK_TLS_PORT"
  echo "export NODEPOOL_TEST_ZK_CA=$CERTS/ca.pem"
  echo "export NODEPOOL_TEST_ZK_CERT=$CERTS/client.pem"
  echo "export NODEPOOL_TEST_ZK_KEY=$CERTS/client.key"
}

run_foreground() {
  prepare
  exec "${JAVA_CMD[@]}"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) env_vars ;;
  run) run_foreground ;;
  *) echo "usage: $0 start|stop|env|run" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Boots IMAGE under QEMU (TCG) with an OpenStack config drive carrying a fresh
# ed25519 public key and a hostname, waits for the SSH banner, logs in as
# root with that key, checks the hostname came from the config drive, powers
# the VM off and removes everything it made:
#
#   testbed/vm/boot-check.sh IMAGE        # e.g. the path build-image.sh prints
#
# Exit 0 when the login worked and the hostname matched; 1 when the guest
# answered wrongly, 2 on no banner/login in time or a setup error (the tail of
# the serial console is printed on any failure). Timings go to stdout as `timing ...`
# lines. Env: BOOT_CHECK_TIMEOUT (s to a login, default 300),
# BOOT_CHECK_SERIAL_LOG (keep the serial console log at this path),
# BOOT_CHECK_MEM (MiB, default 1024), BOOT_CHECK_ANALYZE=1 (also print the
# guest's systemd-analyze, blame, disk and memory after the check).
set -euo pipefail
log() { echo "testbed/vm/boot-check.sh: $*" >&2; }
die() { log "$*"; exit 2; }

[[ $# == 1 ]] || die "usage: boot-check.sh IMAGE"
IMAGE=$(readlink -f "$1")
[[ -s $IMAGE ]] || die "IMAGE $1: no such file"
LIMIT=${BOOT_CHECK_TIMEOUT:-300}

# --- host packages --------------------------------------------------------
# qemu-system-x86 must come from the same release line as qemu-utils (here
# bookworm-backports 10.0.2); bookworm's 7.2 would replace qemu-utils.
need_install() {
  local missing=() v
  command -v mkfs.vfat >/dev/null || missing+=(dosfstools)
  command -v mcopy >/dev/null || missing+=(mtools)
  command -v ssh >/dev/null || missing+=(openssh-client)
  command -v ssh-keygen >/dev/null || missing+=(openssh-client)
  command -v python3 >/dev/null || missing+=(python3)
  if ! command -v qemu-system-x86_64 >/dev/null; then
    v=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [[ -n $v ]]; then missing+=("qemu-system-x86=$v")
    else missing+=(qemu-system-x86/bookworm-backports qemu-utils/bookworm-backports); fi
  fi
  command -v qemu-img >/dev/null || missing+=(qemu-utils/bookworm-backports)
  (( ${#missing[@]} )) || return 0
  [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]} and not root to install them"
  log "installing from Debian: ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 || log "apt-get update failed; trying the install anyway"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}
need_install

# --- scratch dir and cleanup --------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/boot-check.XXXXXX")
QEMU_PID=
cleanup() {
  local rc=$?
  if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill -TERM "$QEMU_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  if [[ $rc != 0 && -f $WORK/serial.log ]]; then
    log "last lines of the serial console:"
    tail -n 40 "$WORK/serial.log" | tr -d '\r' >&2
  fi
  if [[ -n ${BOOT_CHECK_SERIAL_LOG:-} && -f $WORK/serial.log ]]; then
    cp "$WORK/serial.log" "$BOOT_CHECK_SERIAL_LOG" || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# --- key and config drive -----------------------------------------------
ssh-keygen -q -t ed25519 -N '' -C boot-check -f "$WORK/key"
HOST=bootcheck-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
UUID=$(cat /proc/sys/kernel/random/uuid)
mkdir -p "$WORK/cd/openstack/latest"
python3 - "$WORK/cd/openstack/latest/meta_data.json" "$HOST" "$UUID" "$WORK/key.pub" <<'PY'
import json, sys
path, host, uuid, pub = sys.argv[1:]
key = open(pub).read().strip()
json.dump({
    "uuid": uuid,
    "name": host,
    "hostname": host,
    "launch_index": 0,
    "availability_zone": "nova",
    "public_keys": {"boot-check": key},
    "keys": [{"name": "boot-check", "type": "ssh", "data": key}],
    "meta": {"nodepool_node_id": "0000000000"},
}, open(path, "w"), indent=1)
PY
# vfat built from files with mtools: no mount and no loop device needed.
truncate -s 4M "$WORK/config-drive.img"
mkfs.vfat -n config-2 "$WORK/config-drive.img" >/dev/null 2>&1
MTOOLS_SKIP_CHECK=1 mcopy -s -i "$WORK/config-drive.img" "$WORK/cd/openstack" ::/
MTOOLS_SKIP_CHECK=1 mdir -i "$WORK/config-drive.img" ::/openstack/latest | grep -qi meta_data ||
  die "config drive: meta_data.json not found after mcopy"

# --- boot -----------------------------------------------------------------
qemu-img create -q -f qcow2 -b "$IMAGE" -F qcow2 "$WORK/overlay.qcow2"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
t_start=$(date +%s.%N)
qemu-system-x86_64 -accel tcg -m "${BOOT_CHECK_MEM:-1024}" -smp 1 \
  -display none -monitor none -nodefaults -no-user-config \
  -serial "file:$WORK/serial.log" \
  -drive "file=$WORK/overlay.qcow2,if=virtio,format=qcow2" \
  -drive "file=$WORK/config-drive.img,if=virtio,format=raw,readonly=on" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:22" \
  -device virtio-net-pci,netdev=n0,romfile= \
  -device virtio-rng-pci \
  >"$WORK/qemu.out" 2>&1 &
QEMU_PID=$!
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t_start" "$(date +%s.%N)"; }
alive() { kill -0 "$QEMU_PID" 2>/dev/null || { cat "$WORK/qemu.out" >&2; die "qemu exited early"; }; }

# The host side of a forwarded port accepts at once even with no sshd in
# the guest: only an SSH banner shows sshd is up.
banner() {
  timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT && head -c 4 <&3" 2>/dev/null || true
}
deadline=$(( $(date +%s) + LIMIT ))
until [[ $(banner) == SSH- ]]; do
  alive
  (( $(date +%s) < deadline )) || die "no SSH banner on 127.0.0.1:$PORT within $LIMIT s"
  sleep 1
done
t_banner=$(elapsed)
log "SSH banner after $t_banner s"

SSH=(ssh -i "$WORK/key" -p "$PORT" -o BatchMode=yes -o IdentitiesOnly=yes
  -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
  -o ConnectTimeout=10 root@127.0.0.1)
# sshd may come up just before glean has written the key: retry until the
# same deadline.
until "${SSH[@]}" 'hostname; cat /etc/os-release' >"$WORK/out" 2>"$WORK/ssh.err"; do
  alive
  (( $(date +%s) < deadline )) || die "no SSH login as root within $LIMIT s: $(cat "$WORK/ssh.err")"
  sleep 2
done
t_login=$(elapsed)
cat "$WORK/out"
got=$(head -n 1 "$WORK/out")
[[ $got == "$HOST" ]] || { log "hostname is '$got', the config drive said '$HOST'"; exit 1; }
grep -q '^VERSION_CODENAME=bookworm' "$WORK/out" || { log "not Debian bookworm"; exit 1; }
log "logged in as root with the config-drive key; hostname $got from the config drive"

if [[ ${BOOT_CHECK_ANALYZE:-0} == 1 ]]; then
  "${SSH[@]}" 'systemd-analyze || true; systemd-analyze blame | head -n 15; df -h /; free -m' || true
fi

# --- shut down ------------------------------------------------------------
"${SSH[@]}" 'systemctl poweroff' >/dev/null 2>&1 || true
off_deadline=$(( $(date +%s) + 120 ))
while kill -0 "$QEMU_PID" 2>/dev/null && (( $(date +%s) < off_deadline )); do sleep 0.5; done
if kill -0 "$QEMU_PID" 2>/dev/null; then
  log "VM did not power off within 120 s; killing qemu"
else
  wait "$QEMU_PID" 2>/dev/null || true
  QEMU_PID=
fi
t_off=$(elapsed)
echo "timing boot_to_banner_s=$t_banner boot_to_login_s=$t_login boot_to_poweroff_s=$t_off"

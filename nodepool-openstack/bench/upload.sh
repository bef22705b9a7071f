#!/usr/bin/env bash
# Upload benchmark against the testbed's Glance (testbed/openstack must be
# running): the same file uploaded by `curl -T` and by nodepool-openstack's
# upload_image (examples/upload_bench.rs), alternating, ROUNDS times each.
#
#   nodepool-openstack/bench/upload.sh [SIZE_MIB (2048)] [ROUNDS (2)]
#
# Prints, per run, seconds and MiB/s (for ours: the PUT alone, as curl's,
# and the whole upload_image with create and wait), ours' peak RSS (VmHWM),
# and the medians.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE=${1:-2048}
ROUNDS=${2:-2}
CLOUDS=${NODEPOOL_TEST_CLOUDS_YAML:-/tmp/openstack-peer/clouds.yaml}
F=${BENCH_FILE:-${TMPDIR:-/tmp}/nodepool-upload-bench-$SIZE.raw}
KS=http://127.0.0.1:5000/v3
GL=http://127.0.0.1:9292/v2

[[ -f $CLOUDS ]] || { echo "no $CLOUDS: start testbed/openstack/start.sh first" >&2; exit 1; }
if [[ ! -f $F || $(stat -c %s "$F") != $((SIZE << 20)) ]]; then
  echo "making $F ($SIZE MiB of random bytes)"
  head -c $((SIZE << 20)) /dev/urandom > "$F"
fi
cargo build -q --release -p nodepool-openstack --example upload_bench
BIN=${CARGO_TARGET_DIR:-target}/release/examples/upload_bench

TOKEN=$(curl -s -i -X POST "$KS/auth/tokens" -H 'content-type: application/json' -d '{"auth": {
  "identity": {"methods": ["password"], "password": {"user": {"name": "admin",
  "domain": {"name": "Default"}, "password": "secret"}}},
  "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}}' \
  | tr -d '\r' | awk -F': ' 'tolower($1) == "x-subject-token" {print $2}')
[[ -n $TOKEN ]] || { echo "could not get a token from $KS" >&2; exit 1; }

curl_upload() {
  local id out
  id=$(curl -s -X POST "$GL/images" -H "X-Auth-Token: $TOKEN" -H 'content-type: application/json' \
    -d '{"name": "testbed-bench-curl", "disk_format": "raw", "container_format": "bare"}' \
    | grep -o '"id": *"[^"]*"' | head -1 | cut -d'"' -f4)
  out=$(curl -s -o /dev/null -w '%{http_code} %{time_total} %{speed_upload}' -T "$F" -X PUT \
    -H "X-Auth-Token: $TOKEN" -H 'content-type: application/octet-stream' "$GL/images/$id/file")
  curl -s -o /dev/null -X DELETE -H "X-Auth-Token: $TOKEN" "$GL/images/$id"
  read -r code secs speed <<< "$out"
  [[ $code == 204 ]] || { echo "curl upload failed: HTTP $code" >&2; return 1; }
  awk -v b=$((SIZE << 20)) -v s="$secs" 'BEGIN { printf "curl -T upload: %d bytes in %.2f s = %.1f MiB/s\n", b, s, b / 1048576 / s }'
}

echo "file $F, $SIZE MiB; Glance $GL (file store)"
RES=$(mktemp)
for r in $(seq "$ROUNDS"); do
  curl_upload | tee -a "$RES"
  "$BIN" "$CLOUDS" peer "$F" raw | tee -a "$RES"
done
# medians of MiB/s, and ours relative to curl's
awk '/curl -T upload/ { c[nc++] = $(NF-1) }
     /nodepool-openstack PUT/ { o[no++] = $(NF-1) }
     /nodepool-openstack upload/ { for (i = 1; i <= NF; i++) if ($i == "MiB/s;") u[nu++] = $(i-1);
                                   for (i = 1; i <= NF; i++) if ($i == "RSS") { r = $(i+1); if (r > maxr) maxr = r } }
     function median(a, n,   i, j, t) { for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
                                        return n % 2 ? a[int(n/2)] : (a[n/2-1] + a[n/2]) / 2 }
     END { mc = median(c, nc); mo = median(o, no); mu = median(u, nu);
           printf "median PUT: curl %.1f MiB/s, nodepool-openstack %.1f MiB/s (%.0f %% of curl); whole upload_image %.1f MiB/s; max peak RSS %.1f MiB\n", mc, mo, 100 * mo / mc, mu, maxr }' "$RES"
rm -f "$RES"

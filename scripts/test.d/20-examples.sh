#!/usr/bin/env bash
# The example programs (examples/programs/NAME.rs, `cargo run --example NAME`):
# each is run as a user would copy and run it, and must exit 0. Each prints
# what it did; a program that fails prints why and exits non-zero.
#
#   bash scripts/test.d/20-examples.sh OUTPUT_FILE
#
# The programs use only the embedded default (SQLite file in a temporary
# directory, the simulated cloud or a provider of their own, such as
# custom_provider's local processes) or a store export, so nothing is started
# here.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: 20-examples.sh OUTPUT_FILE}
: >"$OUT"
passed=0
failed=0
cargo build -q --locked -p nodepool-examples --examples || { echo "20-examples: the examples do not build" | tee -a "$OUT" >&2; exit 1; }
for program in examples/programs/*.rs; do
  [[ -e "$program" ]] || continue
  name=$(basename "$program" .rs)
  echo "--- example $name" | tee -a "$OUT"
  if timeout 300 cargo run -q --locked -p nodepool-examples --example "$name" 2>&1 | tee -a "$OUT"; [[ ${PIPESTATUS[0]} == 0 ]]; then
    echo "test example $name ... ok" | tee -a "$OUT"
    passed=$((passed + 1))
  else
    echo "test example $name ... FAILED" | tee -a "$OUT"
    failed=$((failed + 1))
  fi
done
if [[ $failed == 0 ]]; then result=ok; else result=FAILED; fi
echo "test result: $result. $passed passed; $failed failed" | tee -a "$OUT"
[[ $failed == 0 ]]

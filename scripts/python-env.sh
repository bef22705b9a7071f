#!/usr/bin/env bash
# A local Python venv with the reference peers used by interop tests:
# the real Python Nodepool 11.0.0 (it needs setuptools<81 and cachetools
# beside it) and kazoo. Idempotent; prints the variables the tests read.
#
#   eval "$(scripts/python-env.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NODEPOOL_TEST_VENV:-$PWD/.venv}"
STAMP="$VENV/.nodepool-rs-ready-v1"
if [[ ! -f "$STAMP" ]]; then
  echo "python-env.sh: creating $VENV (nodepool==11.0.0, kazoo)" >&2
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check 'nodepool==11.0.0' 'setuptools<81' cachetools kazoo >&2
  touch "$STAMP"
fi
echo "export NODEPOOL_TEST_PYTHON=$VENV/bin/python"
echo "export NODEPOOL_TEST_PY_NODEPOOL=$VENV/bin/nodepool"

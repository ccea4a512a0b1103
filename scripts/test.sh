#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the whole test suite, slow end-to-end
# tests included, whole files side by side on a worker per core (pytest-xdist; -n 0 runs
# them in this process, -n 4 on four workers). Extra arguments go to pytest (e.g.
# -k fixture, -m "not slow", -n 0 -s to see the figures the tests print).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/bridge fetch-models
# the rpc-server the RPC tests start, built here (once, then cached) rather than inside a
# test; BRIDGE_RPC=0 leaves it out, and those tests build it if they run
if [ "${BRIDGE_RPC:-1}" != 0 ]; then
  .venv/bin/python -m exporters.llamacpp_tools ggml-rpc-server
fi
set +e
.venv/bin/python -m pytest -n auto --dist loadfile --no-loadscope-reorder "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test: pytest collected no tests, which counts as a failure" >&2
  exit 1
fi
exit "$rc"

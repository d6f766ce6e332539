#!/usr/bin/env bash
# Runs every test: formatting, clippy on both targets, native tests, the Matrix client suite, the
# web app end to end (Playwright), and the browser tests in headless Chromium. Installs what it
# needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== disk: $(df -h . | tail -1)"
echo "== fmt"
cargo fmt --all -- --check
echo "== clippy (native)"
cargo clippy --all-targets -- -D warnings
cargo clippy --test cross_backend -- -D warnings
echo "== clippy (wasm32)"
cargo clippy --all-targets --target wasm32-unknown-unknown -- -D warnings
cargo clippy --target wasm32-unknown-unknown --test browser_p2p --test browser_p2p_bench --test browser_client_bench -- -D warnings

echo "== native tests"
cargo test

echo "== Matrix clients (matrix-js-sdk) against hyphae-node over HTTP"
cargo build --bin hyphae-node
HYPHAE_NODE_BIN=target/debug/hyphae-node npm run --silent test:client

echo "== Matrix clients (matrix-rust-sdk: sliding sync, the room list, timelines) against hyphae-node"
cargo fmt --manifest-path tests/rust-sdk/Cargo.toml -- --check
CARGO_TARGET_DIR=target/rust-sdk HYPHAE_NODE_BIN=target/debug/hyphae-node \
  cargo test --manifest-path tests/rust-sdk/Cargo.toml

echo "== the web app (Playwright: two browser profiles and hyphae-node serving the app)"
bash scripts/build-web.sh
HYPHAE_NODE_BIN=target/debug/hyphae-node npm run --silent test:web

echo "== browser tests (headless Chromium, IndexedDB)"
mkdir -p target/test-artifacts
export WASM_BINDGEN_TEST_TIMEOUT=${WASM_BINDGEN_TEST_TIMEOUT:-180}
cargo test --target wasm32-unknown-unknown --test browser --test browser_client -- --nocapture | tee target/test-artifacts/browser.log

echo "== browser peer <-> native node over WebSocket and WebRTC-direct (headless Chromium)"
cargo build --example echo_peer
echo_log=target/test-artifacts/echo-peer.log
./target/debug/examples/echo_peer > "$echo_log" 2>&1 &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q '^HYPHAE-ECHO-ROOM ' "$echo_log" && break
  kill -0 $echo_pid 2>/dev/null || { cat "$echo_log"; echo "echo peer died"; exit 1; }
  sleep 0.2
done
export HYPHAE_ECHO_ADDR=$(sed -n 's/^HYPHAE-ECHO-ADDR //p' "$echo_log")
export HYPHAE_ECHO_ROOM=$(sed -n 's/^HYPHAE-ECHO-ROOM //p' "$echo_log")
export HYPHAE_ECHO_WEBRTC=$(sed -n 's/^HYPHAE-ECHO-WEBRTC //p' "$echo_log")
[ -n "$HYPHAE_ECHO_ADDR" ] && [ -n "$HYPHAE_ECHO_ROOM" ] || { cat "$echo_log"; echo "echo peer did not start"; exit 1; }
cargo test --target wasm32-unknown-unknown --test browser_p2p
kill $echo_pid 2>/dev/null || true

echo "== cross-backend: IndexedDB export imported into redb"
HYPHAE_BROWSER_LOG=target/test-artifacts/browser.log cargo test --test cross_backend

#!/usr/bin/env bash
# Reproduces the figures in docs/benchmarks.md: native ingest and state resolution, a client's
# latency during a login flood, a member's latency during peer floods, node memory, a long fuzz
# run, IndexedDB ingest in headless Chromium, the Client-Server API against Synapse and in the
# tab, the size of the release wasm, and the web app (cold start, typed → visible, tab memory).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== machine: $(nproc) cores, $(uname -m), $(date -u +%Y-%m-%d)"
echo "== native (release): cargo bench --bench ingest"
cargo bench --bench ingest 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'
echo "== native (release): cargo bench --bench p2p"
cargo bench --bench p2p 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'

echo "== native (release): cargo bench --bench login_flood"
cargo bench --bench login_flood 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'

echo "== native (release): cargo bench --bench peer_floods"
cargo bench --bench peer_floods 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'

echo "== native (release): cargo bench --bench keys"
cargo bench --bench keys 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'

echo "== native (release): cargo bench --bench media"
cargo bench --bench media 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'

echo "== native (release): cargo bench --bench client_features (sliding sync against /sync, search)"
cargo bench --bench client_features 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'

echo "== native (release): cargo bench --bench memory"
cargo bench --bench memory 2>&1 | grep -v '^\s*\(Compiling\|Finished\|Running\)'

echo "== fuzzing (release): every target, ${HYPHAE_FUZZ_CASES:=20000} cases each (panics must be 0)"
HYPHAE_FUZZ_CASES=$HYPHAE_FUZZ_CASES cargo test --release --test fuzz -- --nocapture --test-threads 1 2>&1 \
  | grep -E '^FUZZ|test result|panicked'

echo "== browser (release, headless Chromium): IndexedDB ingest"
WASM_BINDGEN_TEST_TIMEOUT=600 cargo test --release --target wasm32-unknown-unknown --test browser_bench -- --nocapture 2>&1 \
  | grep -E 'BENCH|test result' | sed 's/^BENCH //'

echo "== browser (release, headless Chromium): browser -> relay node -> browser latency"
cargo build --release --example echo_peer
echo_log=$(mktemp)
./target/release/examples/echo_peer > "$echo_log" 2>&1 &
echo_pid=$!
trap 'kill $echo_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do grep -q '^HYPHAE-ECHO-ADDR ' "$echo_log" && break; sleep 0.2; done
HYPHAE_ECHO_ADDR=$(sed -n 's/^HYPHAE-ECHO-ADDR //p' "$echo_log") WASM_BINDGEN_TEST_TIMEOUT=300 \
  cargo test --release --target wasm32-unknown-unknown --test browser_p2p_bench -- --nocapture 2>&1 \
  | grep -E 'BENCH|test result' | sed 's/^BENCH //'
kill $echo_pid 2>/dev/null || true

echo "== browser (release, headless Chromium): the client API load through the tab's fetch"
WASM_BINDGEN_TEST_TIMEOUT=600 cargo test --release --target wasm32-unknown-unknown --test browser_client_bench -- --nocapture 2>&1 \
  | grep -E 'BENCH|test result' | sed 's/^BENCH //'

echo "== Client-Server API over HTTP, side by side with Synapse"
cargo build --release --bin hyphae-node
bash scripts/bench-client.sh

echo "== release wasm size"
bash scripts/build-web.sh >/dev/null
wasm=pkg/hyphae_bg.wasm
echo "raw:     $(stat -c %s "$wasm") bytes"
echo "gzipped: $(gzip -9 -c "$wasm" | wc -c) bytes"

echo "== the web app (Playwright, headless Chromium, release node serving dist/)"
HYPHAE_NODE_BIN=target/release/hyphae-node npm run --silent bench:web

#!/usr/bin/env bash
# Runs every test: formatting, clippy on both targets, native tests, and the browser tests in
# headless Chromium. Installs what it needs first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy (native)"
cargo clippy --all-targets -- -D warnings
echo "== clippy (wasm32)"
cargo clippy --all-targets --target wasm32-unknown-unknown -- -D warnings

echo "== native tests"
cargo test

echo "== browser tests (headless Chromium, IndexedDB)"
mkdir -p target/test-artifacts
export WASM_BINDGEN_TEST_TIMEOUT=${WASM_BINDGEN_TEST_TIMEOUT:-180}
cargo test --target wasm32-unknown-unknown --test browser -- --nocapture | tee target/test-artifacts/browser.log

echo "== cross-backend: IndexedDB export imported into redb"
HYPHAE_BROWSER_LOG=target/test-artifacts/browser.log cargo test --test cross_backend

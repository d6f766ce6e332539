#!/usr/bin/env bash
# Builds the release wasm and its JS bindings into pkg/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --lib --target wasm32-unknown-unknown
wasm-bindgen --target web --out-dir pkg target/wasm32-unknown-unknown/release/hyphae.wasm

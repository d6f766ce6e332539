#!/usr/bin/env bash
# Builds the release wasm and its JS bindings into pkg/.
set -euo pipefail
cd "$(dirname "$0")/.."
# Built for size: the module is downloaded by every visitor (native builds keep opt-level 3).
# A separate target directory keeps these settings from invalidating the native release build.
export CARGO_PROFILE_RELEASE_OPT_LEVEL=z CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
# (Dependencies too: Cargo.toml's `package."*"` override would otherwise keep them at opt-level 3.)
cargo build --release --lib --target wasm32-unknown-unknown --target-dir target/wasm-size \
  --config 'profile.release.package."*".opt-level="z"'
wasm-bindgen --target web --out-dir pkg target/wasm-size/wasm32-unknown-unknown/release/hyphae.wasm

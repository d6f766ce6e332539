#!/usr/bin/env bash
# Runs Hyphae: builds and starts hyphae-node on ./hyphae-data (override with HYPHAE_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin hyphae-node
exec ./target/release/hyphae-node --data "${HYPHAE_DATA:-./hyphae-data}" "$@"

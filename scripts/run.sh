#!/usr/bin/env bash
# Runs Hyphae: builds the web app and hyphae-node, then starts the node on ./hyphae-data (override
# with HYPHAE_DATA); it serves the app and prints the URL to open. Extra arguments go to the node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build-web.sh
cargo build --release --bin hyphae-node
exec ./target/release/hyphae-node --data "${HYPHAE_DATA:-./hyphae-data}" --web dist "$@"

#!/usr/bin/env bash
# Builds the web app into dist/: the release wasm and its bindings (pkg/), then the webpack bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-wasm.sh
npx webpack --mode production

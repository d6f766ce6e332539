#!/usr/bin/env bash
# Builds the web app into dist/: the release wasm and its bindings (pkg/), then the webpack bundle.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-wasm.sh
npx webpack --mode production
# Served precompressed by `hyphae-node --web` to browsers that accept gzip.
find dist -type f \( -name '*.js' -o -name '*.wasm' -o -name '*.css' -o -name '*.html' -o -name '*.svg' \) \
  -exec gzip -9 -k -f {} +

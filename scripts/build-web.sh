#!/usr/bin/env bash
# Builds the browser package into www/pkg (release, no wasm-opt download, no npm package).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medphi-target}"
wasm-pack --log-level warn build --target web --release --out-dir www/pkg --no-typescript --no-pack \
  -- --locked --no-default-features
ls -l www/pkg/medphi_bg.wasm | awk '{ printf "== www/pkg/medphi_bg.wasm: %.1f MB\n", $5 / 1048576 }'

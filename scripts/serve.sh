#!/usr/bin/env bash
# The main job: builds the wasm package (release) into www/pkg and serves the page with the
# bundled model on http://127.0.0.1:PORT/ (default 8080), cross-origin isolated so the page
# runs the threaded wasm build. Installs the wasm target, rust-src (the threaded build's
# standard library), wasm-bindgen-cli and wasm-pack if missing. Needs no network once they
# are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${1:-8080}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medphi-target}"
source scripts/wasm-tools.sh
scripts/build-web.sh
echo "== serving www/ on http://127.0.0.1:$PORT/ (Ctrl-C stops)"
exec python3 scripts/serve-www.py --port "$PORT" www

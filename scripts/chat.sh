#!/usr/bin/env bash
# Terminal chat: build medphi in release mode and chat with the
# bundled model (MEDPHI_MODEL=DIR or --model for another). Extra arguments go to
# `medphi chat` (e.g. --temperature 0.7).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medphi-target}"
cargo build --locked --release --bin medphi
exec "$CARGO_TARGET_DIR/release/medphi" chat "$@"

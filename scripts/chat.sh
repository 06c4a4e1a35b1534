#!/usr/bin/env bash
# Terminal chat: build medphi in release mode and chat with the
# bundled model. Extra arguments go to `medphi chat` (e.g. --temperature 0.7).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medphi-target}"
MODEL="${MEDPHI_MODEL:-models/tiny-phi}"
cargo build --locked --release --bin medphi
exec "$CARGO_TARGET_DIR/release/medphi" chat --model "$MODEL" "$@"

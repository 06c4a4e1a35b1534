#!/usr/bin/env bash
# Runs every test medphi has: formatting, native unit and integration tests (parity with
# transformers and candle-transformers, GGUF, bad input, CLI), and the wasm32 build.
# Installs what it needs (the wasm32 target); reuses a shared cargo target dir.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medphi-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

rustup component add rustfmt >/dev/null 2>&1 || true
rustup target add wasm32-unknown-unknown >/dev/null

echo "== cargo fmt --check"
cargo fmt --check

echo "== native tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"

echo "== benches compile (cargo bench runs them)"
cargo build --locked --benches

echo "== wasm32 library build (the browser build must never rot)"
cargo build --locked --lib --target wasm32-unknown-unknown --no-default-features

awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

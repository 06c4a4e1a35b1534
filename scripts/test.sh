#!/usr/bin/env bash
# Runs every test medphi has: formatting, native unit and integration tests (parity with
# transformers and candle-transformers, GGUF, bad input, CLI), and the wasm32 build.
# Installs what it needs (the wasm32 target); reuses a shared cargo target dir.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medphi-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# The Vulkan loader complains on every device open without one.
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  export XDG_RUNTIME_DIR
fi

rustup component add rustfmt clippy >/dev/null 2>&1 || true
rustup target add wasm32-unknown-unknown >/dev/null

# The wgpu tests run on Mesa's lavapipe (a CPU Vulkan driver) when no GPU is present.
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing mesa-vulkan-drivers (lavapipe)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    echo "warning: no lavapipe ICD found; the GPU tests need a Vulkan driver (apt install mesa-vulkan-drivers)" >&2
  fi
fi

echo "== cargo fmt --check"
cargo fmt --check

echo "== native tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"

echo "== clippy"
cargo clippy --locked --all-targets -- -D warnings

echo "== benches compile (cargo bench runs them)"
cargo build --locked --benches

echo "== wasm32 library build (the browser build must never rot)"
cargo build --locked --lib --target wasm32-unknown-unknown --no-default-features

awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

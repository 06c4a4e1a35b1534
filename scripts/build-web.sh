#!/usr/bin/env bash
# Builds the browser packages (release, no wasm-opt download, no npm package):
# - www/pkg: single-threaded, for pages that are not cross-origin isolated;
# - www/pkg-threads: wasm atomics and shared memory, rayon's pool on Web Workers, used when
#   the page is cross-origin isolated (scripts/serve.sh's headers or www/isolation-sw.js's
#   service worker). Its standard library is rebuilt with atomics (`-Z build-std`, allowed
#   on the stable toolchain by RUSTC_BOOTSTRAP), so it needs the rust-src component.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medphi-target}"
wasm-pack --log-level warn build --target web --release --out-dir www/pkg --no-typescript --no-pack \
  -- --locked --no-default-features
# Its own target dir: other flags would otherwise rebuild the single-threaded one each time.
# The flags replace .cargo/config.toml's for wasm32, so they repeat them. The linker makes the
# memory shared and imported (each Web Worker instantiates the module on the same memory) and
# exports what wasm-bindgen needs to give each thread its own thread-locals; 4 GiB is wasm32's
# whole address space, and shared memory must name its maximum up front.
threads_flags='-C target-feature=+simd128,+atomics,+bulk-memory,+mutable-globals --cfg getrandom_backend="wasm_js"'
for arg in --shared-memory --import-memory --max-memory=4294967296 \
  --export=__wasm_init_tls --export=__tls_size --export=__tls_align --export=__tls_base; do
  threads_flags+=" -C link-arg=$arg"
done
CARGO_TARGET_DIR="$CARGO_TARGET_DIR/threads" RUSTC_BOOTSTRAP=1 RUSTFLAGS="$threads_flags" \
  wasm-pack --log-level warn build --target web --release --out-dir www/pkg-threads --no-typescript --no-pack \
  -- --locked --no-default-features --features threads -Z build-std=panic_abort,std
for pkg in pkg pkg-threads; do
  ls -l "www/$pkg/medphi_bg.wasm" | awk -v p="$pkg" '{ printf "== www/%s/medphi_bg.wasm: %.1f MB\n", p, $5 / 1048576 }'
done

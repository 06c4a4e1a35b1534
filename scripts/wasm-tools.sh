# Sourced by serve.sh and test.sh: makes sure the wasm32 target, rust-src, a wasm-bindgen-cli of the
# exact version in Cargo.lock (its output must match the library) and wasm-pack are present.
rustup target add wasm32-unknown-unknown >/dev/null
# The threaded browser build rebuilds the standard library with wasm atomics from its source.
rustup component add rust-src >/dev/null
bindgen_version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$bindgen_version" ]; then
  echo "== installing wasm-bindgen-cli $bindgen_version (matches Cargo.lock)"
  cargo install wasm-bindgen-cli --version "$bindgen_version"
fi
if ! command -v wasm-pack >/dev/null; then
  echo "== installing wasm-pack"
  cargo install wasm-pack
fi

#!/usr/bin/env bash
# Runs every test medphi has: formatting, clippy, native unit and integration tests (parity
# with transformers and candle-transformers, GGUF, bad input, CLI, wgpu on lavapipe), the
# NEON kernels' tests on aarch64 under qemu-user, the browser tests (`wasm-pack test` in
# headless Chromium: kernels, model parity, the wasm API)
# and end-to-end tests of the page (playwright-core driving Debian's Chromium; the fine-tune test
# checks the page's LoRA adapter with peft on transformers), and checks that
# the `cuda` feature compiles.
# Installs what it needs (apt packages as root, the wasm32 target, wasm-bindgen-cli,
# wasm-pack, npm packages); reuses a shared cargo target dir.
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

# The wgpu tests run on Mesa's lavapipe (a CPU Vulkan driver) when no GPU is present; the
# browser tests on Debian's Chromium and ChromeDriver; the fault-injection tests fail system
# calls with strace.
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || ! command -v chromedriver >/dev/null \
  || ! command -v strace >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing mesa-vulkan-drivers (lavapipe), chromium, chromium-driver, strace"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mesa-vulkan-drivers libvulkan1 chromium chromium-driver strace >/dev/null
  else
    echo "error: need mesa-vulkan-drivers, chromium, chromium-driver and strace (apt install them as root)" >&2
    exit 1
  fi
fi
source scripts/wasm-tools.sh

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

echo "== the cuda feature compiles (nvcc from PyPI wheels; running it needs an NVIDIA GPU)"
(
  source scripts/cuda-toolkit.sh
  cargo check --locked --features cuda --all-targets
)

echo "== aarch64: the NEON kernels' tests, cross-built and run under qemu-user"
# ARM laptops (Apple's M-series) run our NEON kernels natively; here qemu emulates a CPU with
# the dot product instructions they need. The cross linker and qemu are named here rather than
# in .cargo/config.toml, which would also bind a native ARM build to them.
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing qemu-user and gcc-aarch64-linux-gnu"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
  else
    echo "error: need qemu-user and gcc-aarch64-linux-gnu (apt install them as root)" >&2
    exit 1
  fi
fi
rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1
(
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
  export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
  cargo clippy --locked --lib --tests --target aarch64-unknown-linux-gnu -- -D warnings
  cargo test --locked --target aarch64-unknown-linux-gnu --lib quant_matmul 2>&1 | tee -a "$log"
  # The GGUF tests that run a quantized model on the CPU (the rest start the CLI binary or a GPU,
  # which qemu-user does not give them, and run natively above).
  cargo test --locked --target aarch64-unknown-linux-gnu --test gguf -- \
    q8_0_gguf q4_0_gguf q4_k_gguf q8_0_greedy quantized_ 2>&1 | tee -a "$log"
)

echo "== clippy for wasm32 (the browser-only code)"
cargo clippy --locked --lib --target wasm32-unknown-unknown --no-default-features -- -D warnings

echo "== browser tests: wasm-pack test in headless Chromium (WebGPU on SwiftShader)"
# SwiftShader runs the GPU kernels on the CPU: a test can take longer than the runner's
# default 20 s, and it runs both GPU kernel families. On a loaded machine the page can also
# take longer than ChromeDriver's 300 s to answer one poll of its output, so webdriver.json
# raises ChromeDriver's page-load and script timeouts to 30 minutes.
if ! WASM_BINDGEN_TEST_TIMEOUT=1200 wasm-pack test --headless --chrome --chromedriver "$(command -v chromedriver)" \
  --no-default-features --test web --test gpu_kernels 2>&1 | tee -a "$log"; then
  # A browser that stopped answering leaves its profile behind: its log says what Chromium saw.
  chrome_log="$(ls -t /tmp/org.chromium.Chromium.scoped_dir.*/chrome_debug.log 2>/dev/null | head -1 || true)"
  if [ -n "$chrome_log" ]; then
    echo "== $chrome_log (D-Bus lines left out)"
    grep -v dbus "$chrome_log" | tail -n 60
  fi
  exit 1
fi

# The fine-tune test loads the page's adapter with peft onto transformers' model of the base.
if ! python3 -c "import peft, transformers, torch" 2>/dev/null; then
  echo "== installing peft (with transformers and torch where missing) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check peft==0.21.2
fi

echo "== page end-to-end tests (playwright-core, Debian's chromium)"
# The layouts test compares the page with the CLI: the binary `cargo test` built above.
export MEDPHI_BIN="$CARGO_TARGET_DIR/debug/medphi"
scripts/build-web.sh
npm ci --no-audit --no-fund --silent
npm run -s test:e2e 2>&1 | tee -a "$log"

awk '/^test result:/ { p += $4; f += $6 } /^# pass / { p += $3 } /^# fail / { f += $3 }
  END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

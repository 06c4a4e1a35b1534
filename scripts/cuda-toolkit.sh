# Sourced by scripts that build the `cuda` feature: installs nvcc (with nvvm), the CUDA
# runtime headers and CCCL from NVIDIA's PyPI wheels (no system CUDA needed) under ~/.cache/medphi-cuda, and
# exports CUDA_HOME, PATH and CUDA_COMPUTE_CAP (H100: 90) for candle's kernel build.
CUDA_VERSION_PIN="13.0.*"
CUDA_ROOT="$HOME/.cache/medphi-cuda"
if [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
  echo "== installing nvcc $CUDA_VERSION_PIN from PyPI wheels into $CUDA_ROOT"
  wheels="$(mktemp -d)"
  # Since CUDA 13 nvcc's front end (cicc) and its crt headers ship in their own wheels.
  python3 -m pip download --quiet --no-deps --dest "$wheels" \
    "nvidia-cuda-nvcc==$CUDA_VERSION_PIN" "nvidia-cuda-cccl==$CUDA_VERSION_PIN" \
    "nvidia-cuda-runtime==$CUDA_VERSION_PIN" "nvidia-nvvm==$CUDA_VERSION_PIN" \
    "nvidia-cuda-crt==$CUDA_VERSION_PIN"
  python3 - "$wheels" "$CUDA_ROOT" <<'PY'
import glob, os, stat, sys, zipfile
wheels, root = sys.argv[1:]
for w in glob.glob(f"{wheels}/*.whl"):
    with zipfile.ZipFile(w) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith("nvidia/cu13/") or name.endswith("/"):
                continue
            dest = os.path.join(root, name[len("nvidia/cu13/"):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(z.read(name))
            if "/bin/" in name:
                os.chmod(dest, os.stat(dest).st_mode | stat.S_IEXEC)
PY
  # CCCL ships its headers one level down; nvcc looks in include/.
  if [ -d "$CUDA_ROOT/include/cccl" ]; then
    cp -rn "$CUDA_ROOT/include/cccl/." "$CUDA_ROOT/include/"
  fi
  rm -rf "$wheels"
fi
export CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

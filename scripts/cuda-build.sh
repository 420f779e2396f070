#!/usr/bin/env bash
# Builds kvc with Burn's CUDA backend (`--features cuda`) on a machine without a GPU or a
# CUDA toolkit, from the package registries alone.
#
#   scripts/cuda-build.sh              # → $CARGO_TARGET_DIR (default target)/release/kvc
#   scripts/cuda-build.sh --tests      # also the GPU check's test binaries (scripts/gpu-pack.sh)
#   KVC_FEATURES=cuda,wgpu scripts/cuda-build.sh --tests   # both GPU backends (gpu-check.sh wgpu)
#
# Why the steps: Burn's CUDA backend (cubecl-cuda) compiles kernels to PTX with LLVM
# (cubecl-llvm), whose build dependency tracel-llvm-bundler downloads an LLVM bundle unless
# its directory is marked installed. PyPI carries a relocatable static LLVM 23 SDK
# (mlc-llvm-static, plus mlc-llvm-static-extra-targets for the NVPTX target): its static
# folder, linked where the bundler looks ($XDG_DATA_HOME/tracel/tracel-llvm-<version>) and
# marked installed, is what the bundler would have fetched. cudarc loads the driver at run
# time, so no toolkit is needed to build; CUDARC_CUDA_VERSION fixes which CUDA API it
# binds (12.8 by default: drivers 570 and later, the GPU machines run 580). At run time
# the GPU machine needs the driver (libcuda.so) and libdevice.10.bc (math functions of the
# kernels), found under $CUDA_PATH/nvvm/libdevice: the nvidia-cuda-nvcc-cu12 wheel fetched
# here has it, and scripts/gpu-pack.sh packs it.
#
# Everything fetched lands in $KVC_CUDA_SDK (default ~/.cache/kvc/cuda-sdk), checked by
# sha256. About 12 minutes cold on 2 cores (kvc alone); needs python3 >= 3.10 (the SDK's
# llvm-config is a Python script).
set -euo pipefail
cd "$(dirname "$0")/.."

tests=0
for arg in "$@"; do
  case "$arg" in
    --tests) tests=1 ;;
    *) echo "usage: scripts/cuda-build.sh [--tests]" >&2; exit 2 ;;
  esac
done

PY=${KVC_PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "cuda-build: $PY is older than 3.10 (the LLVM SDK's llvm-config needs 3.10)" >&2; exit 1; }

SDK=${KVC_CUDA_SDK:-$HOME/.cache/kvc/cuda-sdk}
# The bundle directory name tracel-llvm-bundler looks for (its version in Cargo.lock).
BUNDLE=tracel-llvm-$(sed -n '/^name = "tracel-llvm-bundler"$/{n;s/^version = "\(.*\)"$/\1/p;}' Cargo.lock)
[ "$BUNDLE" != tracel-llvm- ] || { echo "cuda-build: tracel-llvm-bundler is not in Cargo.lock" >&2; exit 1; }

mkdir -p "$SDK/wheels"
cat > "$SDK/requirements.txt" <<'REQ'
mlc-llvm-static==23.1.1.post0 --hash=sha256:dcfec888abfaa418be77d41af585805f31463584cf9c90582992c00f392c1ac5
mlc-llvm-static-extra-targets==23.1.1.post0 --hash=sha256:c36e834d9a4e9cf9759f27fece65711ece7a2fc2b5a96dbb15d66f5e9e787929
nvidia-cuda-nvcc-cu12==12.9.86 --hash=sha256:5d6a0d32fdc7ea39917c20065614ae93add6f577d840233237ff08e9a38f58f0
REQ
if [ ! -f "$SDK/.unpacked" ]; then
  echo "cuda-build: fetching the LLVM SDK and libdevice wheels into $SDK" >&2
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$SDK/requirements.txt" -d "$SDK/wheels"
  rm -rf "$SDK/unpacked"
  mkdir -p "$SDK/unpacked"
  for whl in "$SDK"/wheels/*.whl; do
    "$PY" -m zipfile -e "$whl" "$SDK/unpacked"
  done
  touch "$SDK/.unpacked"
fi
llvm="$SDK/unpacked/mlc_llvm_static/static"
[ -d "$llvm/lib" ] || { echo "cuda-build: no LLVM SDK at $llvm" >&2; exit 1; }
chmod +x "$llvm"/bin/* 2>/dev/null || true
ls "$llvm"/lib/libLLVMNVPTX*.a >/dev/null 2>&1 \
  || { echo "cuda-build: the LLVM SDK lacks the NVPTX target" >&2; exit 1; }
mkdir -p "$SDK/data/tracel"
ln -sfn "$llvm" "$SDK/data/tracel/$BUNDLE"
touch "$llvm/.tracel-llvm-installed"

export XDG_DATA_HOME="$SDK/data"
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-12080}
export CUDA_PATH="$SDK/unpacked/nvidia/cuda_nvcc"
echo "cuda-build: LLVM from $llvm, CUDA API $CUDARC_CUDA_VERSION" >&2
features=${KVC_FEATURES:-cuda}
cargo build --release --features "$features" --bin kvc
if [ "$tests" = 1 ]; then
  # The same features and profile as the binary: one build of the dependencies.
  cargo test --release --features "$features" --no-run \
    --test tiny_reference --test kernel_sets --test refill --test kv_policies
fi
kvc="${CARGO_TARGET_DIR:-target}/release/kvc"
echo "cuda-build: built $kvc" >&2
if ! command -v nvidia-smi >/dev/null; then
  echo "cuda-build: no GPU here; --backend cuda should end in one error line:" >&2
  "$kvc" run models/tiny-llama.ron --prompt hello --max-new-tokens 1 --backend cuda || true
fi

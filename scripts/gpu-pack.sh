#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine without internet into kvc-gpu/
# (ignored by git, at most 64 MiB): the release kvc binary and the check's test binaries,
# stripped and xz-compressed, and libdevice.10.bc (the CUDA math library the kernels
# link). Run after `scripts/cuda-build.sh --tests`; the tree plus kvc-gpu/ is what
# travels:
#
#   scripts/cuda-build.sh --tests && scripts/gpu-pack.sh
#   # on the GPU machine, in the tree's root:
#   scripts/gpu-check.sh cuda
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}/release
sdk=${KVC_CUDA_SDK:-$HOME/.cache/kvc/cuda-sdk}
limit=$((64 << 20))
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

cp "$target/kvc" "$stage/kvc"
for t in tiny_reference kernel_sets refill kv_policies; do
  f=$(ls -t "$target"/deps/"$t"-* 2>/dev/null | grep -v '\.d$' | head -1)
  [ -n "$f" ] || { echo "gpu-pack: no $t test binary in $target/deps (scripts/cuda-build.sh --tests)" >&2; exit 1; }
  cp "$f" "$stage/$t"
done
strip "$stage"/*
rm -rf kvc-gpu
mkdir -p kvc-gpu
# The binaries share most of their code (each links Burn and LLVM): a dictionary larger
# than one binary lets xz find each repeated, ≈ 5x smaller than compressing each alone
# (compressing takes ≈ 6 GiB of memory, unpacking 512 MiB).
XZ_OPT="-T1 --lzma2=preset=6,dict=512MiB" tar -C "$stage" -cJf kvc-gpu/bin.tar.xz .
libdevice=$(find "$sdk/unpacked" -name libdevice.10.bc 2>/dev/null | head -1)
if [ -n "$libdevice" ]; then
  cp "$libdevice" kvc-gpu/
else
  echo "gpu-pack: no libdevice.10.bc under $sdk (scripts/cuda-build.sh fetches it); the GPU machine's own CUDA_PATH must have one" >&2
fi
size=$(du -cb kvc-gpu | tail -1 | cut -f1)
echo "gpu-pack: kvc-gpu/ holds $((size >> 20)) MiB: $(ls kvc-gpu | tr '\n' ' ')" >&2
[ "$size" -le "$limit" ] || { echo "gpu-pack: over the 64 MiB a GPU machine's copy may carry" >&2; exit 1; }

#!/usr/bin/env bash
# The GPU check, in one go, on a machine with a GPU and no internet:
#   1. the differential tests that make sense on a GPU, on tiny models of every family:
#      against the float64 references (tiny_reference), the portable kernels against the
#      CPU ones and a recorded-and-replayed decode step against plain steps over 120
#      steps (kernel_sets), refill bit-exactness (refill), every KV policy (kv_policies);
#   2. SmolLM2's greedy text on the GPU against the CPU's (same f32 weights and portable
#      kernels), where its weights are in the cache;
#   3. `kvc bench` on each real model whose weights are in the cache, with the decode step
#      captured and replayed and without: step times at batch 1 and 16.
#
#   scripts/gpu-check.sh [cuda|wgpu]      # default cuda
#
# Binaries come from kvc-gpu/ (scripts/gpu-pack.sh; what travels to the GPU machine) or,
# without it, from ${CARGO_TARGET_DIR:-target}/release and target/release/deps (built by
# `scripts/cuda-build.sh --tests`). Results go to $KVC_GPU_OUT (default gpu-check-out, or
# $OUT/gpu-check where OUT is set). Knobs, for slow software renderers: KVC_GPU_MODELS
# (default "smollm2-135m qwen2.5-coder-0.5b gemma3-270m"), KVC_GPU_STEPS (128),
# KVC_GPU_CONTEXT (512), KVC_GPU_BATCH (1,16), KVC_GPU_TOKENS (32, greedy text).
# Exits non-zero if any test or comparison failed; a missing model is reported and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
backend=${1:-cuda}
case "$backend" in cuda|wgpu) ;; *) echo "usage: scripts/gpu-check.sh [cuda|wgpu]" >&2; exit 2 ;; esac
out=${KVC_GPU_OUT:-${OUT:+$OUT/gpu-check}}
out=${out:-gpu-check-out}
mkdir -p "$out"
log="$out/gpu-check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }
failed=0

# Binaries: the pack's (unpacked once into a scratch folder) or the build's.
if [ -f kvc-gpu/bin.tar.xz ]; then
  bin=${TMPDIR:-/tmp}/kvc-gpu-bin
  mkdir -p "$bin"
  tar -xJf kvc-gpu/bin.tar.xz -C "$bin"
  if [ -f kvc-gpu/libdevice.10.bc ] && [ ! -f "${CUDA_PATH:-/nonexistent}/nvvm/libdevice/libdevice.10.bc" ]; then
    mkdir -p "$bin/cuda/nvvm/libdevice"
    cp kvc-gpu/libdevice.10.bc "$bin/cuda/nvvm/libdevice/"
    export CUDA_PATH="$bin/cuda"
  fi
  [ -d kvc-gpu/cache ] && export KVC_CACHE_DIR="$root/kvc-gpu/cache"
else
  target=${CARGO_TARGET_DIR:-target}/release
  bin=$(mktemp -d)
  cp "$target/kvc" "$bin/"
  for t in tiny_reference kernel_sets refill kv_policies; do
    # The newest test binary of each name (cargo names them name-HASH).
    f=$(ls -t "$target"/deps/"$t"-* 2>/dev/null | grep -v '\.d$' | head -1)
    [ -n "$f" ] && cp "$f" "$bin/$t"
  done
fi
kvc="$bin/kvc"
[ -x "$kvc" ] || { say "gpu-check: no kvc binary (run scripts/cuda-build.sh --tests)"; exit 1; }

say "gpu-check: backend $backend, $(date -u +%FT%TZ), $(uname -m)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$log"
"$kvc" --version | tee -a "$log"

# 1. Differential tests on tiny models.
for t in tiny_reference kernel_sets refill kv_policies; do
  if [ ! -x "$bin/$t" ]; then say "FAIL $t: test binary missing"; failed=1; continue; fi
  start=$(date +%s)
  KVC_TEST_BACKEND=$backend KVC_REPO_ROOT=$root "$bin/$t" > "$out/test-$t.txt" 2>&1
  rc=$?
  summary=$(grep '^test result:' "$out/test-$t.txt" | tail -1)
  if [ $rc = 0 ]; then say "ok   $t ($(( $(date +%s) - start )) s): $summary"
  else say "FAIL $t (exit $rc): ${summary:-no summary; see test-$t.txt}"; failed=1; fi
done

# Whether the weights of models/$1.ron are in the cache (kvc would otherwise fetch them).
have_weights() {
  local file
  file=$(sed -n 's/^ *file: *"\(.*\)",.*/\1/p' "models/$1.ron" | head -1)
  [ -n "$file" ] && find "${KVC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvc}" -name "$file" 2>/dev/null | grep -q .
}

# 2. SmolLM2's greedy text, GPU against CPU, the same f32 weights and portable kernels.
tokens=${KVC_GPU_TOKENS:-32}
if have_weights smollm2-135m; then
  prompt="The three primary colors are"
  for b in flex "$backend"; do
    "$kvc" run models/smollm2-135m.ron --prompt "$prompt" --max-new-tokens "$tokens" --json \
      --weight-dtype f32 --kv-storage f32 --kernels portable --backend "$b" \
      > "$out/smollm2-$b.json" 2> "$out/smollm2-$b.err" \
      || { say "FAIL smollm2 run on $b: $(tail -1 "$out/smollm2-$b.err")"; failed=1; }
  done
  if cmp -s "$out/smollm2-flex.json" "$out/smollm2-$backend.json"; then
    say "ok   smollm2 greedy: $tokens tokens equal to the CPU's"
  else
    say "FAIL smollm2 greedy: the texts differ (smollm2-flex.json, smollm2-$backend.json)"; failed=1
  fi
else
  say "skip smollm2 greedy: weights not in the cache"
fi

# 3. Decode step times, captured and replayed against eager.
steps=${KVC_GPU_STEPS:-128}
context=${KVC_GPU_CONTEXT:-512}
batch=${KVC_GPU_BATCH:-1,16}
for m in ${KVC_GPU_MODELS:-smollm2-135m qwen2.5-coder-0.5b gemma3-270m}; do
  if ! have_weights "$m"; then say "skip bench $m: weights not in the cache"; continue; fi
  for capture in off on; do
    if "$kvc" bench "models/$m.ron" --backend "$backend" --capture "$capture" \
        --batch "$batch" --context "$context" --steps "$steps" \
        --json "$out/bench-$m-capture-$capture.json" > "$out/bench-$m-capture-$capture.txt" 2>&1; then
      say "ok   bench $m capture $capture"
      sed 's/^/     /' "$out/bench-$m-capture-$capture.txt" | tee -a "$log" > /dev/null
    else
      say "FAIL bench $m capture $capture: $(tail -1 "$out/bench-$m-capture-$capture.txt")"; failed=1
    fi
  done
done

if [ $failed = 0 ]; then say "gpu-check: all passed"; else say "gpu-check: FAILED"; fi
exit $failed

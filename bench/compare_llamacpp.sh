#!/usr/bin/env bash
# kvc against llama.cpp's own C++ tools on the same GGUF file, the same machine and thread
# count, rounds interleaved in one sitting, for every real model spec:
#
#   prefill 512         llama-bench -p 512 -n 0          vs  kvc bench --batch 1 (prefill)
#   decode at depth 512 llama-bench -p 0 -n 128 -d 512   vs  kvc bench --batch 1 (decode)
#   16 sequences        llama-batched-bench -npl 16 -npp 512 -ntg 128
#                                                        vs  kvc bench --batch 16 (aggregate)
#
# kvc keeps the file's own blocks (`--weight-dtype native`) and prefills the 512 tokens in
# one chunk. Prints each round, then the best and the median of every figure and the
# ratios (kvc / llama.cpp), the CPU model and its flags.
#
#   bench/compare_llamacpp.sh [ROUNDS=2] [THREADS=2] [SPEC...]
#
# The llama.cpp tools come from bench/build_llamacpp.sh (run first if they are missing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
THREADS=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
SPECS=("$@")
[ ${#SPECS[@]} -gt 0 ] || SPECS=(models/smollm2-135m.ron models/qwen2.5-coder-0.5b.ron models/gemma3-270m.ron)
PROMPT=512
DECODE=128
SEQS=16
PY=${KVC_PYTHON:-python3}
LLAMA=bench/llama.cpp/bin
[ -x "$LLAMA/llama-bench" ] || bash bench/build_llamacpp.sh
cargo build --release --quiet
KVC=${CARGO_TARGET_DIR:-target}/release/kvc
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "flags: $(grep -ow 'avx512[a-z_0-9]*\|avx_vnni\|amx[a-z_0-9]*\|avx2\|fma\|f16c' /proc/cpuinfo | sort -u | xargs)"
echo "llama.cpp: llama-cpp-python $(cat bench/llama.cpp/VERSION)'s vendor copy; kvc $(git rev-parse --short HEAD)"
echo "$THREADS threads, $ROUNDS rounds, prompt $PROMPT, decode $DECODE, $SEQS sequences"

# The cached GGUF file of a spec, fetched through kvc itself (kvc names the file it uses).
gguf_of() {
  "$KVC" run "$1" --prompt "warm up" --max-new-tokens 1 2>&1 >/dev/null | sed -n 's/^weights: //p' | tail -1
}

# One round of one model: five measurements, appended as JSON lines to $RAW/NAME.
round() {
  local spec=$1 gguf=$2 out=$3 k
  # llama-bench reports the mean of its repetitions in tokens per second.
  "$LLAMA/llama-bench" -m "$gguf" -t "$THREADS" -p "$PROMPT" -n 0 -r 3 -o json 2>/dev/null \
    | "$PY" -c 'import json,sys; print(json.dumps({"llama_pp": json.load(sys.stdin)[0]["avg_ts"]}))' >>"$out"
  "$LLAMA/llama-bench" -m "$gguf" -t "$THREADS" -p 0 -n "$DECODE" -d "$PROMPT" -r 3 -o json 2>/dev/null \
    | "$PY" -c 'import json,sys; print(json.dumps({"llama_tg": json.load(sys.stdin)[0]["avg_ts"]}))' >>"$out"
  k=$(mktemp -p "$RAW")
  RAYON_NUM_THREADS=$THREADS "$KVC" bench "$spec" --batch 1 --context "$PROMPT" --steps "$DECODE" \
    --prefill-len "$PROMPT" --weight-dtype native --json "$k" >/dev/null
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print(json.dumps({"kvc_pp": r["prefill_tok_s"], "kvc_tg": r["decode_tok_s_row"]}))' "$k" >>"$out"
  "$LLAMA/llama-batched-bench" -m "$gguf" -t "$THREADS" -tb "$THREADS" -c $(( SEQS * (PROMPT + DECODE) )) \
    -b 2048 -ub 512 -npp "$PROMPT" -ntg "$DECODE" -npl "$SEQS" --output-format jsonl 2>/dev/null \
    | grep '^{' | tail -1 \
    | "$PY" -c 'import json,sys; r=json.loads(sys.stdin.read()); print(json.dumps({"llama_b16": r["speed_tg"]}))' >>"$out"
  RAYON_NUM_THREADS=$THREADS "$KVC" bench "$spec" --batch "$SEQS" --context "$PROMPT" --steps "$DECODE" \
    --prefill-len "$PROMPT" --weight-dtype native --json "$k" >/dev/null
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print(json.dumps({"kvc_b16": r["decode_tok_s_aggregate"]}))' "$k" >>"$out"
}

declare -A FILES
for spec in "${SPECS[@]}"; do
  FILES[$spec]=$(gguf_of "$spec")
  [ -f "${FILES[$spec]}" ] || { echo "$spec: no weights file found" >&2; exit 1; }
done
for r in $(seq 1 "$ROUNDS"); do
  for spec in "${SPECS[@]}"; do
    echo "round $r: $spec" >&2
    round "$spec" "${FILES[$spec]}" "$RAW/$(basename "$spec" .ron)"
  done
done

for spec in "${SPECS[@]}"; do
  "$PY" - "$spec" "${FILES[$spec]}" "$RAW/$(basename "$spec" .ron)" <<'PY'
import json, os, statistics, sys
spec, gguf, path = sys.argv[1:4]
runs = {}
for line in open(path):
    for k, v in json.loads(line).items():
        runs.setdefault(k, []).append(v)
best = {k: max(v) for k, v in runs.items()}
med = {k: statistics.median(v) for k, v in runs.items()}
print(f"\n{spec}: {os.path.basename(gguf)} ({os.path.getsize(gguf) / 2**20:.0f} MiB), tok/s")
print(f"{'':34} {'llama.cpp':>10} {'kvc':>10} {'ratio':>7}   (best; median)")
for name, l, k, what in [
    ("prefill 512", "llama_pp", "kvc_pp", "llama-bench -p 512"),
    ("decode at depth 512, batch 1", "llama_tg", "kvc_tg", "llama-bench -n 128 -d 512"),
    ("decode, 16 sequences (aggregate)", "llama_b16", "kvc_b16", "llama-batched-bench -npl 16"),
]:
    print(f"{name:34} {best[l]:10.1f} {best[k]:10.1f} {best[k] / best[l]:6.2f}x   "
          f"({med[l]:.1f} vs {med[k]:.1f}: {med[k] / med[l]:.2f}x)  [{what}]")
print("rounds: " + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in runs.items()))
PY
done

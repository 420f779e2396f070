#!/usr/bin/env bash
# Two kvc binaries on the same models, rounds alternated in one sitting: prefill 512 and
# decode at depth 512 at batch 1, and the batch-16 aggregate decode, with the figures
# `bench/compare_llamacpp.sh` takes for kvc. For checking that a change moves no speed
# (a restructuring) or how much it gains.
#
#   bench/compare_builds.sh OLD_KVC NEW_KVC [ROUNDS=3] [THREADS=2] [SPEC...]
#
# Prints every round, then per figure the best and the median of each binary and their
# ratio (new / old), the CPU model and its flags.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?old kvc binary}
NEW=${2:?new kvc binary}
ROUNDS=${3:-3}
THREADS=${4:-2}
shift $(( $# < 4 ? $# : 4 ))
SPECS=("$@")
[ ${#SPECS[@]} -gt 0 ] || SPECS=(models/smollm2-135m.ron models/qwen2.5-coder-0.5b.ron models/gemma3-270m.ron)
PY=${KVC_PYTHON:-python3}
RAW=$(mktemp -d)
trap 'rm -rf "$RAW"' EXIT

echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "flags: $(grep -ow 'avx512[a-z_0-9]*\|avx_vnni\|amx[a-z_0-9]*\|avx2\|fma\|f16c' /proc/cpuinfo | sort -u | xargs)"
echo "old: $OLD; new: $NEW; $THREADS threads, $ROUNDS rounds"

# One measurement set of binary $1 on spec $2, appended as JSON lines to $3.
measure() {
  local kvc=$1 spec=$2 out=$3 tag=$4 k
  k=$(mktemp -p "$RAW")
  RAYON_NUM_THREADS=$THREADS "$kvc" bench "$spec" --batch 1 --context 512 --steps 128 \
    --prefill-len 512 --weight-dtype native --json "$k" >/dev/null
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; t=sys.argv[2]; print(json.dumps({t+"_pp": r["prefill_tok_s"], t+"_tg": r["decode_tok_s_row"]}))' "$k" "$tag" >>"$out"
  RAYON_NUM_THREADS=$THREADS "$kvc" bench "$spec" --batch 16 --context 512 --steps 128 \
    --prefill-len 512 --weight-dtype native --json "$k" >/dev/null
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; t=sys.argv[2]; print(json.dumps({t+"_b16": r["decode_tok_s_aggregate"]}))' "$k" "$tag" >>"$out"
}

for r in $(seq 1 "$ROUNDS"); do
  for spec in "${SPECS[@]}"; do
    out="$RAW/$(basename "$spec" .ron)"
    # Alternate which binary goes first, so neither always runs on a warmer machine.
    if (( r % 2 )); then
      measure "$OLD" "$spec" "$out" old; measure "$NEW" "$spec" "$out" new
    else
      measure "$NEW" "$spec" "$out" new; measure "$OLD" "$spec" "$out" old
    fi
    echo "round $r: $spec" >&2
  done
done

for spec in "${SPECS[@]}"; do
  "$PY" - "$spec" "$RAW/$(basename "$spec" .ron)" <<'PY'
import json, statistics, sys
spec, path = sys.argv[1:3]
runs = {}
for line in open(path):
    for k, v in json.loads(line).items():
        runs.setdefault(k, []).append(v)
print(f"\n{spec}, tok/s: {'old':>10} {'new':>10} {'new/old':>8}   (best; median)")
for name, f in [("prefill 512", "pp"), ("decode at depth 512, batch 1", "tg"),
                ("decode, batch 16 (aggregate)", "b16")]:
    o, n = runs["old_" + f], runs["new_" + f]
    print(f"{name:34} {max(o):10.1f} {max(n):10.1f} {max(n) / max(o):7.3f}x   "
          f"({statistics.median(o):.1f} vs {statistics.median(n):.1f}: "
          f"{statistics.median(n) / statistics.median(o):.3f}x)")
print("rounds: " + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in sorted(runs.items())))
PY
done

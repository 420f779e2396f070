#!/usr/bin/env bash
# Side-by-side speed of llama.cpp (via llama-cpp-python) and kvc on the same GGUF file, the
# same machine, prompt length and thread count, in one run, for every real model spec:
# llama.cpp on the file as users run it, kvc with the file's own blocks (`--weight-dtype
# native`) at batch 1, and kvc's batch-16 aggregate decode. Prints every row, the CPU
# flags, and the ratios the targets are stated in.
#
#   bench/compare_llamacpp.sh [PROMPT_TOKENS=512] [DECODE_TOKENS=128] [THREADS=2] [SPEC...]
#
# First use creates bench/.venv with llama-cpp-python built from source (several minutes).
# llama.cpp's native CPU build on some Xeons emits AMX instructions and dies with SIGILL on
# quantized types, so it is built with explicit flags instead of -march=native: AVX2/FMA/F16C,
# plus AVX-512 (with VNNI) only where /proc/cpuinfo lists avx512f.
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-512}
DECODE=${2:-128}
THREADS=${3:-2}
shift $(( $# < 3 ? $# : 3 ))
SPECS=("$@")
[ ${#SPECS[@]} -gt 0 ] || SPECS=(models/smollm2-135m.ron models/qwen2.5-coder-0.5b.ron models/gemma3-270m.ron)
VENV=bench/.venv
PY=${KVC_PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  AVX512=OFF
  grep -qw avx512f /proc/cpuinfo 2>/dev/null && AVX512=ON
  VNNI=OFF
  grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null && VNNI=ON
  echo "building llama-cpp-python from source, AVX-512 $AVX512, VNNI $VNNI (several minutes on 2 cores)..." >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$AVX512 -DGGML_AVX512_VNNI=$VNNI -DGGML_FMA=ON -DGGML_F16C=ON" \
    "$VENV/bin/pip" install --quiet --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
fi

cargo build --release --quiet
KVC=${CARGO_TARGET_DIR:-target}/release/kvc
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "flags: $(grep -ow 'avx512[a-z_0-9]*\|avx_vnni\|amx[a-z_0-9]*\|avx2\|fma\|f16c' /proc/cpuinfo | sort -u | xargs)"
echo "prompt $PROMPT tokens, $DECODE decode steps, $THREADS threads"

llama() {
  "$VENV/bin/python" - "$1" "$PROMPT" "$DECODE" "$THREADS" <<'PY'
import json, sys, time
from llama_cpp import Llama

path, n_prompt, n_decode, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=n_prompt + n_decode + 8, n_batch=n_prompt, n_threads=threads,
            n_threads_batch=threads, verbose=False)
vocab = llm.n_vocab()
prompt = [(i * 7919 + 13) % vocab for i in range(n_prompt)]
best = None
for _ in range(2):
    llm.reset()
    t0 = time.perf_counter(); llm.eval(prompt); t1 = time.perf_counter()
    steps = []
    # The cost of a step does not depend on which token is fed.
    for i in range(n_decode):
        s = time.perf_counter(); llm.eval([(i * 31 + 7) % vocab]); steps.append(time.perf_counter() - s)
    steps.sort()
    r = {"prefill_tok_s": n_prompt / (t1 - t0), "decode_tok_s": n_decode / sum(steps),
         "p50_ms": steps[len(steps) // 2] * 1e3}
    best = r if best is None or r["decode_tok_s"] > best["decode_tok_s"] else best
print(json.dumps(best))
PY
}
# kvc at the same prompt length with a prefill width of 512 (one chunk) and native weights.
kvc() {
  local out; out=$(mktemp)
  RAYON_NUM_THREADS=$THREADS "$KVC" bench "$1" --batch "$2" --context "$PROMPT" \
    --steps "$DECODE" --weight-dtype native --json "$out" >/dev/null
  cat "$out"; rm -f "$out"
}

for SPEC in "${SPECS[@]}"; do
  # Fetches (or finds) the cached GGUF through kvc itself; kvc names the file it uses.
  GGUF=$("$KVC" run "$SPEC" --prompt "warm up" --max-new-tokens 1 2>&1 >/dev/null \
    | sed -n 's/^weights: //p' | tail -1)
  [ -f "$GGUF" ] || { echo "$SPEC: no weights file found" >&2; exit 1; }
  L=$(llama "$GGUF"); K1=$(kvc "$SPEC" 1); K16=$(kvc "$SPEC" 16)
  "$PY" - "$SPEC" "$GGUF" "$L" "$K1" "$K16" <<'PY'
import json, os, sys
spec, gguf, l = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
k1, kb = (json.loads(a)["results"][0] for a in sys.argv[4:6])
pl = k1["plan"]
plan_total = (pl["weights"] + pl["kv_cache"] + pl["control"]
              + max(pl["prefill_activations"], pl["decode_activations"]))
print(f"\n{spec}: {os.path.basename(gguf)} ({os.path.getsize(gguf) / 2**20:.0f} MiB)")
print(f"{'':28} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode p50 ms':>14}")
print(f"{'llama.cpp (same file)':28} {l['prefill_tok_s']:14.1f} {l['decode_tok_s']:13.1f} {l['p50_ms']:14.2f}")
print(f"{'kvc native, batch 1':28} {k1['prefill_tok_s']:14.1f} {k1['decode_tok_s_row']:13.1f} {k1['step_ms']['p50']:14.2f}")
print(f"{'kvc native, batch 16 (all)':28} {kb['prefill_tok_s']:14.1f} {kb['decode_tok_s_aggregate']:13.1f} {kb['step_ms']['p50']:14.2f}")
print(f"ratios: decode {k1['decode_tok_s_row'] / l['decode_tok_s']:.2f}x, "
      f"prefill {k1['prefill_tok_s'] / l['prefill_tok_s']:.2f}x, "
      f"batch-16 aggregate / llama.cpp batch 1 {kb['decode_tok_s_aggregate'] / l['decode_tok_s']:.2f}x; "
      f"peak RSS {k1['peak_rss'] / 2**20:.0f} MiB vs plan {plan_total / 2**20:.0f} MiB "
      f"({k1['peak_rss'] / plan_total:.2f}x; without the {k1.get('rss_code', 0) / 2**20:.0f} MiB "
      f"of program code {(k1['peak_rss'] - k1.get('rss_code', 0)) / plan_total:.2f}x)")
PY
done

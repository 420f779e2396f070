#!/usr/bin/env bash
# Builds llama.cpp's own C++ tools — llama-bench, llama-batched-bench and llama-server — the
# anchors kvc's speed is compared with (bench/compare_llamacpp.sh, bench/serve_load.py).
# The source is the llama-cpp-python source distribution on PyPI (its vendor/llama.cpp),
# built with cmake and ninja from PyPI: nothing outside the package registries is fetched.
# A benchmark, not a test: CI never runs this.
#
#   bench/build_llamacpp.sh            # → bench/llama.cpp/bin/{llama-bench,llama-batched-bench,llama-server}
#
# llama.cpp's native build (-march=native) emits AMX instructions on some Xeons and dies
# with SIGILL on quantized types, so the instruction sets are named: AVX2/FMA/F16C, plus
# AVX-512 and VNNI only where /proc/cpuinfo lists them. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
OUT=llama.cpp
TOOLS=(llama-bench llama-batched-bench llama-server)
if [ -f "$OUT/VERSION" ] && [ "$(cat "$OUT/VERSION")" = "$VERSION" ] \
   && for t in "${TOOLS[@]}"; do [ -x "$OUT/bin/$t" ] || exit 1; done; then
  echo "llama.cpp tools of llama-cpp-python $VERSION already in bench/$OUT/bin" >&2
  exit 0
fi
PY=${KVC_PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet cmake ninja
"$work/venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
  "llama-cpp-python==$VERSION" -d "$work"
tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
has() { grep -qw "$1" /proc/cpuinfo 2>/dev/null && echo ON || echo OFF; }
echo "building llama.cpp ($VERSION's vendor copy): AVX-512 $(has avx512f), VNNI $(has avx512_vnni)" >&2
PATH="$work/venv/bin:$PATH" cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VNNI="$(has avx512_vnni)" \
  -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
PATH="$work/venv/bin:$PATH" cmake --build "$work/build" --target "${TOOLS[@]}" -j "$(nproc)"
rm -rf "$OUT"
mkdir -p "$OUT/bin"
for t in "${TOOLS[@]}"; do cp "$work/build/bin/$t" "$OUT/bin/"; done
echo "$VERSION" > "$OUT/VERSION"
echo "built: bench/$OUT/bin/{${TOOLS[*]}}" >&2

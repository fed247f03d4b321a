#!/usr/bin/env bash
# Builds llama.cpp's llama-bench for the llama.cpp row of scripts/benchmark.py (optional, not in CI).
#
#   ./scripts/build_llamacpp.sh            # -> ~/.cache/flexfast/llama.cpp/bin/llama-bench
#
# The source is the llama.cpp that llama-cpp-python==0.3.36 vendors, taken from its PyPI source archive, built
# for this CPU (GGML_NATIVE=ON) into the user's cache, never into the repo. Set LLAMACPP_DIR to build elsewhere
# and JOBS to change the parallel jobs (default 2).
#
# GCC 12 and AMX: _tile_loadconfig declares an 8-byte memory operand, so GCC 12 drops the stores that fill the
# 64-byte tile config on the stack in ggml_tile_config_init (amx/mmq.cpp) and the AMX matmul dies with SIGSEGV.
# A compiler barrier on &tc just before the load keeps the stores. Harmless where the CPU has no AMX.
set -euo pipefail

VERSION=0.3.36
DIR="${LLAMACPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flexfast/llama.cpp}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python}"

mkdir -p "$DIR"
SRC="$DIR/llama_cpp_python-$VERSION"
if [ ! -d "$SRC/vendor/llama.cpp" ]; then
    echo "downloading the llama-cpp-python==$VERSION source archive from PyPI" >&2
    "$PYTHON" -m pip download --no-deps --no-binary :all: -q "llama-cpp-python==$VERSION" -d "$DIR"
    tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
fi
LLAMA="$SRC/vendor/llama.cpp"

MMQ="$LLAMA/ggml/src/ggml-cpu/amx/mmq.cpp"
if ! grep -q 'flexfast: keep the tile config stores' "$MMQ"; then
    grep -q '^    _tile_loadconfig(&tc);' "$MMQ" || { echo "error: _tile_loadconfig(&tc) not found in $MMQ" >&2; exit 1; }
    sed -i 's|^    _tile_loadconfig(&tc);|    __asm__ __volatile__("" : : "r"(\&tc) : "memory");  // flexfast: keep the tile config stores (GCC 12)\n    _tile_loadconfig(\&tc);|' "$MMQ"
fi

cmake -S "$LLAMA" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$DIR/build" --target llama-bench -j "$JOBS" >&2
mkdir -p "$DIR/bin"
cp "$DIR/build/bin/llama-bench" "$DIR/bin/llama-bench.tmp" && mv "$DIR/bin/llama-bench.tmp" "$DIR/bin/llama-bench"
echo "$DIR/bin/llama-bench"

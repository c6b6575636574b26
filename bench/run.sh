#!/usr/bin/env bash
# The chatd benchmark, one command: bash bench/run.sh [--quick] [--ledger on|off] [--callers]
# Installs what it needs (nginx, wrk, LiteLLM's proxy, Portkey's gateway), then runs run.py,
# which prints the table and writes it to bench/RESULTS.md. A full run takes ~7 minutes,
# --quick ~1 minute (plus a few minutes the first time, for the installs).
# A peer that cannot be installed shows as n/a in the table; the run goes on.
# BENCH_CHATD=/path/to/venv/bin/chatd measures another build (default: this checkout's .venv).
set -uo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$BENCH")"
OUT="$BENCH/out"
mkdir -p "$OUT"

# Kill whatever run.py started if it could not clean up itself (pids it wrote, by id).
cleanup() {
  [ -f "$OUT/pids" ] || return 0
  while read -r pid; do kill -TERM -- "-$pid" 2>/dev/null; done <"$OUT/pids"
  rm -f "$OUT/pids"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
cleanup  # leftovers from an earlier run that was killed hard

missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v redis-server >/dev/null || missing+=(redis-server)  # the redis_url row
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (apt-get)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
    >"$OUT/apt.log" 2>&1 || { echo "apt-get failed, see $OUT/apt.log"; exit 1; }
fi

install_litellm() {
  [ -x "$BENCH/.venv-litellm/bin/litellm" ] && return 0
  echo "installing litellm[proxy] into bench/.venv-litellm (background)"
  { python3 -m venv "$BENCH/.venv-litellm" &&
    "$BENCH/.venv-litellm/bin/pip" install -q 'litellm[proxy]'; } >"$OUT/litellm-install.log" 2>&1 \
    || echo "pip install 'litellm[proxy]' failed: $(tail -n 1 "$OUT/litellm-install.log")" \
      >"$OUT/litellm-install.failed"
}
install_portkey() {
  [ -f "$BENCH/portkey/node_modules/@portkey-ai/gateway/build/start-server.js" ] && return 0
  echo "installing @portkey-ai/gateway into bench/portkey (background)"
  mkdir -p "$BENCH/portkey"
  [ -f "$BENCH/portkey/package.json" ] || echo '{"private": true}' >"$BENCH/portkey/package.json"
  (cd "$BENCH/portkey" && npm install --no-audit --no-fund @portkey-ai/gateway) \
    >"$OUT/portkey-install.log" 2>&1 \
    || echo "npm install @portkey-ai/gateway failed: $(tail -n 1 "$OUT/portkey-install.log")" \
      >"$OUT/portkey-install.failed"
}
rm -f "$OUT"/*-install.failed
install_litellm & install_portkey & wait

PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
"$PY" "$BENCH/run.py" "$@"

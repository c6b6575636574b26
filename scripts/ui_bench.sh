#!/usr/bin/env bash
# What the dashboard costs the hot path: `/v1/chat` on the `mock` kind with `[chatd] ui`
# on (its ring buffer fed by every request) against off, with wrk. Both chatds serve at
# once and the runs alternate, so other load on the box falls on both alike; requests per
# CPU-second is the figure to read on a shared machine.
#   scripts/ui_bench.sh                        # c=32, 10 s per run, 5 runs per setting
#   DURATION=5 RUNS=3 scripts/ui_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
CONNS="${CONNS:-32}"
RUNS="${RUNS:-5}"
THREADS="${THREADS:-1}"
PYTHON="${PYTHON:-.venv/bin/python}"
command -v wrk >/dev/null || { echo "wrk not found (apt-get install -y wrk)" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/lakehouse.toml" <<'TOML'
[chatd]
default_provider = "mock"

[chatd.providers.mock]
kind = "mock"

[chatd.providers.ollama]
kind = "ollama"
enabled = false
TOML
cat >"$work/chat.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"mock/echo","messages":[{"role":"user","content":"hello there from wrk"}]}'
LUA

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

declare -A port pid_of rates per_cpu
for ui in true false; do
  port[$ui]="$(free_port)"
  CHATD_UI="$ui" "$PYTHON" -m chatd --config "$work/lakehouse.toml" --bind "127.0.0.1:${port[$ui]}" \
    >"$work/chatd-$ui.log" 2>&1 &
  pids+=("$!")
  pid_of[$ui]="$!"
  for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:${port[$ui]}/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:${port[$ui]}/ui" >/dev/null 2>&1 && echo "ui=$ui: /ui served" || echo "ui=$ui: no /ui"
  wrk -t"$THREADS" -c"$CONNS" -d2s -s "$work/chat.lua" "http://127.0.0.1:${port[$ui]}/v1/chat" >/dev/null
done

cpu_secs() {
  awk -v tick="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / tick}' "/proc/$1/stat"
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

echo "nproc=$(nproc) c=$CONNS duration=${DURATION}s runs=$RUNS load=$(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$RUNS"); do
  for ui in true false; do
    before="$(cpu_secs "${pid_of[$ui]}")"
    out="$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -s "$work/chat.lua" "http://127.0.0.1:${port[$ui]}/v1/chat")"
    after="$(cpu_secs "${pid_of[$ui]}")"
    rate="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
    total="$(awk '/requests in/ {print $1}' <<<"$out")"
    cpu="$(awk -v a="$before" -v b="$after" -v t="$total" 'BEGIN {printf "%.0f", t / (b - a)}')"
    echo "run=$run ui=$ui req/s=$rate req_per_cpu_sec=$cpu"
    rates[$ui]+="$rate "
    per_cpu[$ui]+="$cpu "
  done
done
for ui in true false; do
  echo "ui=$ui median req/s=$(tr ' ' '\n' <<<"${rates[$ui]}" | grep . | median)" \
    "median req_per_cpu_sec=$(tr ' ' '\n' <<<"${per_cpu[$ui]}" | grep . | median)"
done

#!/usr/bin/env bash
# Requests/s of `chatd --workers 2` against 1 worker, on the `mock` kind (no upstream), with wrk.
#   scripts/workers_bench.sh                   # c=32, 10 s per run, 3 runs per setting
#   DURATION=5 RUNS=1 CONNS=64 scripts/workers_bench.sh
#   WORKERS="1 2 4" scripts/workers_bench.sh  # compare more settings (ratio is last vs first)
#   THREADS=1 scripts/workers_bench.sh         # fewer wrk threads (it shares the CPUs)
# chatd runs as shipped (JSON request log on, to a file); wrk runs with 2 threads on the same
# machine, so on a small box it competes with the workers for CPU: read numbers with `nproc`.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
CONNS="${CONNS:-32}"
RUNS="${RUNS:-3}"
WORKERS="${WORKERS:-1 2}"
THREADS="${THREADS:-2}"           # wrk threads
PORT="${PORT:-3290}"            # first setting's port; the next ones count up
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

start_chatd() {  # start_chatd WORKERS PORT
  "$PYTHON" -m chatd --config "$work/lakehouse.toml" --bind "127.0.0.1:$2" --workers "$1" \
    >"$work/chatd-$1.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 300); do
    curl -fsS "http://127.0.0.1:$2/health" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "chatd --workers $1 did not come up:" >&2
  cat "$work/chatd-$1.log" >&2
  exit 1
}

# CPU seconds used so far by a chatd and its worker processes (utime + stime).
cpu_secs() {
  local tick; tick="$(getconf CLK_TCK)"
  for pid in "$1" $(pgrep -P "$1" || true); do cat "/proc/$pid/stat" 2>/dev/null || true; done |
    awk -v tick="$tick" '{sub(/^.*\) /, ""); total += $12 + $13} END {printf "%.2f", total / tick}'
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

# Every setting serves at once on its own port (an idle chatd costs nothing), and the runs
# alternate between them, so whatever else the machine does falls on all settings alike.
declare -A port rates pid_of
offset=0
for n in $WORKERS; do
  port[$n]=$((PORT + offset))
  offset=$((offset + 1))
  start_chatd "$n" "${port[$n]}"
  pid_of[$n]="${pids[-1]}"
  wrk -t"$THREADS" -c"$CONNS" -d2s -s "$work/chat.lua" "http://127.0.0.1:${port[$n]}/v1/chat" >/dev/null
done

echo "nproc=$(nproc) wrk_threads=$THREADS c=$CONNS duration=${DURATION}s runs=$RUNS load=$(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$RUNS"); do
  for n in $WORKERS; do
    cpu_before="$(cpu_secs "${pid_of[$n]}")"
    out="$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" -s "$work/chat.lua" "http://127.0.0.1:${port[$n]}/v1/chat")"
    cpu_after="$(cpu_secs "${pid_of[$n]}")"
    rate="$(awk '/^Requests\/sec/ {print $2}' <<<"$out")"
    total="$(awk '/requests in/ {print $1}' <<<"$out")"
    errors="$(awk '/Non-2xx/ {print $NF}' <<<"$out")"
    avg="$(awk '/Latency/ {print $2; exit}' <<<"$out")"
    # CPU use shows whether the workers got the cores (other load on the box takes them).
    cpu="$(awk -v a="$cpu_before" -v b="$cpu_after" -v d="$DURATION" -v t="$total" \
      'BEGIN {printf "cores_used=%.2f req_per_cpu_sec=%.0f", (b - a) / d, t / (b - a)}')"
    echo "run=$run workers=$n req/s=$rate avg_latency=$avg non_2xx=${errors:-0} $cpu"
    rates[$n]+="$rate "
  done
done

declare -A result
for n in $WORKERS; do
  result[$n]="$(tr ' ' '\n' <<<"${rates[$n]}" | grep . | median)"
  echo "workers=$n median req/s=${result[$n]}"
done
first="${WORKERS%% *}"
last="${WORKERS##* }"
awk -v a="${result[$first]}" -v b="${result[$last]}" -v f="$first" -v l="$last" \
  'BEGIN {printf "speed-up workers=%s vs workers=%s: %.2fx\n", l, f, b / a}'

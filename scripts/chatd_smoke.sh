#!/usr/bin/env bash
# chatd acceptance gate (docs/getting-started.md): six checks against a running chatd, with curl.
#   scripts/chatd_smoke.sh [URL]        default URL http://127.0.0.1:3220
# Environment:
#   CHATD_SMOKE_MODEL      model served by the default provider (default qwen3.5:latest)
#   CHATD_SMOKE_PROVIDERS  comma-separated registered providers expected by check 1
#                          (default "ollama": dev mode, no keys anywhere)
#   CHATD_SMOKE_TOKEN      bearer token, when chatd's inbound auth is on
set -uo pipefail

URL="${1:-http://127.0.0.1:3220}"
URL="${URL%/}"
MODEL="${CHATD_SMOKE_MODEL:-qwen3.5:latest}"
EXPECTED="${CHATD_SMOKE_PROVIDERS:-ollama}"
PY="$(command -v python3 || command -v python)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
AUTH=()
[[ -n "${CHATD_SMOKE_TOKEN:-}" ]] && AUTH=(-H "Authorization: Bearer ${CHATD_SMOKE_TOKEN}")

pass=0
total=0

# request METHOD PATH [JSON] -> sets STATUS, body in $TMP/body
request() {
  local method="$1" path="$2" data="${3:-}"
  local args=(-sS -o "$TMP/body" -w '%{http_code}' -X "$method" --max-time 120 "${AUTH[@]}")
  [[ -n "$data" ]] && args+=(-H 'Content-Type: application/json' --data "$data")
  STATUS="$(curl "${args[@]}" "$URL$path" 2>"$TMP/curl.err")" || STATUS="000"
}

# jget EXPR -> evaluates a Python expression over the body bound to `b`
jget() {
  "$PY" -c 'import json,sys; b=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' \
    "$TMP/body" "$1" 2>/dev/null
}

check() {
  local name="$1" ok="$2" detail="$3"
  total=$((total + 1))
  if [[ "$ok" == "True" ]]; then
    pass=$((pass + 1))
    echo "PASS $total. $name"
  else
    echo "FAIL $total. $name — $detail"
  fi
}

brief() { head -c 300 "$TMP/body" 2>/dev/null; }

# 1. /v1/chat/providers lists exactly the registered providers
request GET /v1/chat/providers
names="$(jget '",".join(p["name"] for p in b["providers"])')"
want="$("$PY" -c 'import sys; print(",".join(sorted(x.strip() for x in sys.argv[1].split(",") if x.strip())))' "$EXPECTED")"
check "providers lists exactly the registered providers ($want)" \
  "$([[ "$STATUS" == 200 && "$names" == "$want" ]] && echo True)" \
  "status $STATUS, listed [$names]: $(brief)"
default="$(jget 'b["default"]')"

# 2. a bare model goes to the default provider with content, token counts and latency
request POST /v1/chat "{\"model\":\"$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello in one word.\"}],\"max_tokens\":16}"
ok="$("$PY" -c 'import json,sys; b=json.load(open(sys.argv[1])); print(b.get("provider")==sys.argv[2] and isinstance(b.get("content"),str) and b["content"]!="" and isinstance(b.get("input_tokens"),int) and isinstance(b.get("output_tokens"),int) and b["output_tokens"]>0 and isinstance(b.get("latency_ms"),int))' "$TMP/body" "$default" 2>/dev/null)"
check "bare $MODEL → default provider ($default) with content, tokens, latency" \
  "$([[ "$STATUS" == 200 && "$ok" == True ]] && echo True)" "status $STATUS: $(brief)"

# 3. ollama/<m> reaches the upstream with the prefix stripped
request POST /v1/chat "{\"model\":\"ollama/$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":8}"
served="$(jget 'b["model"]+" via "+b["provider"]')"
check "ollama/$MODEL → upstream model $MODEL (prefix stripped)" \
  "$([[ "$STATUS" == 200 && "$served" == "$MODEL via ollama" ]] && echo True)" \
  "status $STATUS, served [$served]: $(brief)"

# 4. <m>:cloud with no ollama_cloud registered → 404
cloud="${MODEL%%:*}:cloud"
request POST /v1/chat "{\"model\":\"$cloud\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
type="$(jget 'b["error"]["type"]')"
check "$cloud without ollama_cloud → 404 provider_not_found" \
  "$([[ "$STATUS" == 404 && "$type" == provider_not_found ]] && echo True)" \
  "status $STATUS: $(brief)"

# 5. unknown/<m> falls through to the default, unrewritten → the upstream's error → 502
request POST /v1/chat "{\"model\":\"unknown/$MODEL\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"
type="$(jget 'b["error"]["type"]')"
quoted="$("$PY" -c 'import json,sys; b=json.load(open(sys.argv[1])); print(sys.argv[2] in b["error"]["message"])' "$TMP/body" "unknown/$MODEL" 2>/dev/null)"
check "unknown/$MODEL → default provider, unrewritten → 502 upstream_error" \
  "$([[ "$STATUS" == 502 && "$type" == upstream_error && "$quoted" == True ]] && echo True)" \
  "status $STATUS: $(brief)"

# 6. a body with no model → 400
request POST /v1/chat '{"messages":[{"role":"user","content":"hi"}]}'
type="$(jget 'b["error"]["type"]')"
check "no model → 400 invalid_request" \
  "$([[ "$STATUS" == 400 && "$type" == invalid_request ]] && echo True)" \
  "status $STATUS: $(brief)"

echo "$pass/$total PASS"
[[ "$pass" == "$total" ]]

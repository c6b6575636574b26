#!/usr/bin/env bash
# The whole test suite, on a fresh machine: makes .venv, installs chatd with its test
# extras, installs the real servers the tests start themselves when they are missing
# (nginx: reverse-proxy tests; postgresql: the usage ledger; redis-server: shared state;
# chromium + chromium-driver: the dashboard's browser test; systemd: systemd-analyze
# verify for deploy/chatd.service), lints, tests.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# Debian package -> a file that says it is installed.
declare -A NEEDED=(
  [nginx]="$(command -v nginx || true)"
  [postgresql]="$(ls /usr/lib/postgresql/*/bin/postgres 2>/dev/null | head -n 1 || true)"
  [redis-server]="$(command -v redis-server || true)"
  [chromium]="$(command -v chromium || true)"
  [chromium-driver]="$(command -v chromedriver || true)"
  [systemd]="$(command -v systemd-analyze || true)"
)
missing=()
for package in "${!NEEDED[@]}"; do
  [[ -n "${NEEDED[$package]}" ]] || missing+=("$package")
done
if ((${#missing[@]})); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (real servers and a browser the tests start themselves)"
    # The packages' own services (a PostgreSQL on 5432, a Redis on 6379) must not start:
    # the tests run their own on free ports. policy-rc.d tells invoke-rc.d so.
    policy=/usr/sbin/policy-rc.d
    made_policy=
    if [[ ! -e $policy ]]; then
      printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
      >/tmp/chatd-apt.log 2>&1 || echo "apt-get install failed; see /tmp/chatd-apt.log"
    [[ -z $made_policy ]] || rm -f "$policy"
  else
    echo "missing ${missing[*]}: the tests that need them are skipped"
  fi
fi

# Arize Phoenix, the trace backend the tracing tests start and read spans back from, in
# an environment of its own (its dependencies would clash with chatd's).
if [[ ! -x .venv-phoenix/bin/phoenix ]]; then
  "$PYTHON" -m venv .venv-phoenix
  .venv-phoenix/bin/python -m pip install -q --disable-pip-version-check arize-phoenix \
    >/tmp/chatd-phoenix.log 2>&1 || echo "installing arize-phoenix failed; see /tmp/chatd-phoenix.log"
fi

.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

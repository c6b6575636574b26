#!/usr/bin/env bash
# The whole test suite, on a fresh machine: makes .venv, installs chatd with its test
# extras, installs nginx and redis-server if missing (for the reverse-proxy and replica
# tests), lints, tests.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

if ! command -v nginx >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing nginx (needed by the reverse-proxy streaming test)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx) \
      >/tmp/chatd-apt.log 2>&1 || echo "nginx install failed; see /tmp/chatd-apt.log"
  fi
fi

if ! command -v redis-server >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (needed by the shared-state and replica tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
      >/tmp/chatd-apt-redis.log 2>&1 || echo "redis-server install failed; see /tmp/chatd-apt-redis.log"
  fi
fi

.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# The whole test suite, on a fresh machine: makes .venv, installs chatd with its test
# extras, installs nginx and postgresql if missing (reverse-proxy streaming test, usage
# ledger tests), lints, tests.
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

# PostgreSQL for the usage ledger's tests (SPEC §12): they start their own server, as the
# postgres user, in a tmp dir, on a free port.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql (needed by the usage ledger's PostgreSQL tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
      >/tmp/chatd-apt-postgresql.log 2>&1 || echo "postgresql install failed; see /tmp/chatd-apt-postgresql.log"
  fi
fi

.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Start chatd on 127.0.0.1:3220 with the shipped lakehouse.toml (installing it first if needed).
#   scripts/serve.sh [chatd args...]     e.g. scripts/serve.sh --log-level debug
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/chatd ]]; then
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
exec .venv/bin/chatd --config lakehouse.toml "$@"

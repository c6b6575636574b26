#!/usr/bin/env bash
# The full-size fuzz run: schemathesis over chatd's own OpenAPI schema with
# CHATD_FUZZ_EXAMPLES examples per operation (default 1000, several thousand requests),
# plus the hand-made hostile bodies. The test command runs the same file at 300.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || { python3 -m venv .venv; }
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
CHATD_FUZZ_EXAMPLES="${CHATD_FUZZ_EXAMPLES:-1000}" \
  exec .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py "$@"

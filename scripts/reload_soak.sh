#!/usr/bin/env bash
# The full reload soak (docs/reload.md): 8 callers, streamed and non-streamed, for 20 s
# while the config is reloaded 20 times by SIGHUP, POST /admin/reload and watch_config in
# turn, each reload removing the provider the requests are using. Prints the report and
# exits non-zero on any failed request, cut stream, reload not taken, or ledger row not
# priced by the config its request started on. The test run has a 7 s version.
#   scripts/reload_soak.sh [--seconds S] [--reloads N] [--callers C]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || { python3 -m venv .venv; }
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m tests.soak_reload "$@"

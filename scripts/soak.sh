#!/usr/bin/env bash
# The full-size bounded soak: a real chatd against fake upstreams that randomly
# answer 200, 429 or 500, hang past the 1 s deadline, reset the connection or break a
# stream, with callers that hang up. Prints the report (requests, statuses, wall time,
# req/s, chatd's RSS before and after, its connections to the fakes) and exits non-zero
# on any lost, duplicated or malformed answer, leaked connection, or RSS growth over
# SOAK_MAX_RSS_GROWTH_MB (default 30). The test command runs the same driver at 600.
#   scripts/soak.sh [--requests N] [--concurrency C] [--seed S] [--json]
#   SOAK_REQUESTS=20000 SOAK_CONCURRENCY=100 scripts/soak.sh
# The callers soak (docs/callers-and-usage.md): many callers with rpm/tpm/budget/concurrency limits at once;
# afterwards ledger rows == requests answered and each caller's ledger spend == what the
# fake upstream reported.
#   scripts/soak.sh callers [--requests N] [--concurrency C] [--seed S]
# The exposed soak (docs/exposing.md): one worker, 2,000 connections trickling their
# headers for 60 s beside 20 ordinary callers; ordinary p99 within 2x of a quiet run, none
# failed, chatd's RSS printed.
#   scripts/soak.sh exposed [--slow N] [--secs S] [--callers C] [--quiet-secs S]
# The full-gateway chaos soak (docs/operations.md): two replicas behind a real nginx, callers
# with limits, the ledger in a real PostgreSQL, a real Redis, the cache on, faulting fakes;
# Redis and PostgreSQL killed and restarted and one replica drained (SIGTERM) and restarted
# mid-run. Every request answered once and well formed, no 500, ledger rows == answers, each
# caller's ledger spend == what the fakes reported, each replica's enforced spend == the
# ledger's within 1 s of the end. Needs redis-server, nginx, PostgreSQL and root.
#   scripts/soak.sh gateway [--requests 20000] [--concurrency 48] [--seed S]
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || { python3 -m venv .venv; }
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
if [[ "${1:-}" == callers ]]; then
  shift
  SOAK_REQUESTS="${SOAK_REQUESTS:-3000}" SOAK_CONCURRENCY="${SOAK_CONCURRENCY:-40}" \
    exec .venv/bin/python -m tests.soak_callers "$@"
fi
if [[ "${1:-}" == gateway ]]; then
  shift
  exec .venv/bin/python -m tests.soak_gateway "$@"
fi
if [[ "${1:-}" == exposed ]]; then
  shift
  exec .venv/bin/python -m tests.soak_exposed "$@"
fi
SOAK_REQUESTS="${SOAK_REQUESTS:-5000}" SOAK_CONCURRENCY="${SOAK_CONCURRENCY:-50}" \
  exec .venv/bin/python -m tests.soak "$@"

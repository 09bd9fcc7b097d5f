#!/usr/bin/env bash
# The whole test suite, from a fresh machine: sets up ./.venv from the lock files, then runs pytest
# on 2 workers (tests marked with one xdist_group share a worker, so their module fixtures are
# built once). Extra arguments go to pytest (e.g. `bash launch/test.sh tests/encoders -k sam`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup -q "$@"

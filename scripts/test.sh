#!/usr/bin/env bash
# Install into .venv, lint, and run the whole test suite (no network, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh dev
.venv/bin/ruff check runtime clients tests benchmarks
.venv/bin/ruff format --check runtime clients tests benchmarks
# two workers, each running whole test files (their module fixtures start servers once);
# the suite takes ~10 min on two cores this way, ~18 min in one process (-n 0)
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"

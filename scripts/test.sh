#!/usr/bin/env bash
# Install into .venv, lint, and run the whole test suite (no network, no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh dev
.venv/bin/ruff check runtime clients tests benchmarks
.venv/bin/ruff format --check runtime clients tests benchmarks
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Lint and test, as CI does. Assumes scripts/bootstrap.sh has made .venv.
# Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Create an isolated environment in .venv and install geoopt_sgd with the given extras.
# Usage: bash scripts/bootstrap.sh [EXTRAS]   (default EXTRAS: recipes)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-recipes}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"

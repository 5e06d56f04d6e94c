#!/usr/bin/env bash
# Create an isolated environment in .venv and install geoopt_sgd with the given extras,
# under constraints.txt (torch 2.14.1 / torchvision 0.29.1).
# Usage: bash scripts/bootstrap.sh [EXTRAS]   (default EXTRAS: recipes)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-recipes}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# pip's notes about unreadable local index locations are noise here: filter them out,
# keep pip's exit status.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]" 2>&1 \
  | { grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true; }
echo "bootstrap: installed geoopt_sgd[${extras}] into .venv"

#!/usr/bin/env bash
# Build the documentation site strictly: any warning (a broken link or reference,
# a public name without a docstring, a docstring parameter that is not in the
# signature) fails the build. Output in site/.
# Usage: bash scripts/docs.sh [extra mkdocs build arguments]
# Needs the `docs` extra (mkdocs, mkdocs-material, mkdocstrings[python]); torch is
# not needed: the API pages are read from the sources by static analysis.
# MKDOCS overrides the command (default: .venv/bin/mkdocs, else mkdocs on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdocs="${MKDOCS:-}"
if [ -z "$mkdocs" ]; then
  if [ -x .venv/bin/mkdocs ]; then mkdocs=.venv/bin/mkdocs; else mkdocs=mkdocs; fi
fi
NO_MKDOCS_2_WARNING=1 "$mkdocs" build --strict "$@"

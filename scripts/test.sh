#!/usr/bin/env bash
# The test command: set up .venv, then run the whole pytest suite (slow end-to-end checks included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# The main job: set up .venv, then run the embedded-data experiment end to end and its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fwbw demo --out "${1:-runs/demo}"

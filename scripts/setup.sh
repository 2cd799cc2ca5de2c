#!/usr/bin/env bash
# Create .venv (once) and install fwbw into it with its test dependencies, the retrieval extra and
# the cluster extra (launchers and trackers).
# torch: an already installed torch is kept; otherwise $FWBW_TORCH (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "${FWBW_TORCH:-torch==2.13.0}"
.venv/bin/pip install -q -e ".[dev,retrieval,cluster]"

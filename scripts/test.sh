#!/usr/bin/env bash
# The test command: set up .venv, then run the whole pytest suite (slow end-to-end checks included).
# As root with apt-get (CI), it first installs slurm-wlm and munge for the real SLURM tests
# (tests/test_slurm_real.py start a private single-node cluster); elsewhere those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
has() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! { has slurmctld && has slurmd && has munged && has sbatch; }; then
    echo "installing slurm-wlm and munge for the real SLURM tests" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >/dev/null 2>&1 \
        || echo "could not install slurm-wlm and munge: the real SLURM tests will say so" >&2
fi
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"

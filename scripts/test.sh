#!/usr/bin/env bash
# test.sh -- the one command that runs hpcdist's tests on a fresh machine (root, Debian 12).
#
#   bash scripts/test.sh              # setup (.venv, Slurm n1..n3 with accounting), then every test
#   bash scripts/test.sh -k render    # extra arguments go to pytest
#
# Tests marked `slurm` need the local cluster; this script brings it up first and leaves it running. They run
# one at a time, since they share its three nodes; every other test runs on two workers at once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --slurm
started=$(date +%s)
status=0
# The slowest tests and the whole run's time are printed every time: CI's budget here is 20 minutes.
# pytest's 5 (nothing selected) is a failure only when neither half ran a test.
unit=0 cluster=0
# worksteal: a worker that runs out of tests takes the other's queue, so the half ends with both busy.
.venv/bin/python -m pytest -ra --durations=15 -m "not slurm" -n 2 --dist worksteal "$@" || unit=$?
.venv/bin/python -m pytest -ra --durations=25 -m slurm "$@" || cluster=$?
if [ "$unit" -eq 5 ] && [ "$cluster" -eq 5 ]; then
    status=5
elif [ "$unit" -ne 0 ] && [ "$unit" -ne 5 ]; then
    status=$unit
elif [ "$cluster" -ne 0 ] && [ "$cluster" -ne 5 ]; then
    status=$cluster
fi
took=$(( $(date +%s) - started ))
echo "tests took $((took / 60)) min $((took % 60)) s"
if [ "$took" -gt 1200 ]; then
    echo "WARNING: the tests took over 20 minutes ($((took / 60)) min), past CI's budget: see the slowest above" >&2
fi
exit "$status"

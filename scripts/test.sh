#!/usr/bin/env bash
# test.sh -- the one command that runs hpcdist's tests on a fresh machine (root, Debian 12).
#
#   bash scripts/test.sh              # setup (.venv, Slurm n1..n3 with accounting), then every test
#   bash scripts/test.sh -k render    # extra arguments go to pytest
#
# Tests marked `slurm` need the local cluster; this script brings it up first and leaves it running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --slurm
exec .venv/bin/python -m pytest -ra "$@"

#!/usr/bin/env bash
# setup.sh -- make .venv with hpcdist and its training stack; with --slurm also a local 3-node Slurm.
#
#   bash scripts/setup.sh            # .venv: torch, torchvision, deepspeed, submitit, hpcdist (editable)
#   bash scripts/setup.sh --slurm    # also apt-get Slurm + accounting and start nodes n1..n3 (root)
#
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log() { echo "[setup $(date +%T)] $*" >&2; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
# One pip run for torch and the rest: one resolution over the two local indexes, ~15 s less than two.
needed="torch, torchvision, deepspeed, submitit, hpc, hypothesis, pytest_timeout, xdist, matplotlib, PIL, ruff"
if ! .venv/bin/python -c "import $needed" >/dev/null 2>&1; then
  log "installing torch + torchvision (from local disk), hpcdist (editable), deepspeed and test tools (~1 min)"
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[train,test,bench]"
fi

if [ "${1:-}" = --slurm ]; then
  command -v shellcheck >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q shellcheck; }
  # Containers: Charliecloud and runc (Slurm's srun --container) run tasks in images that mmdebstrap builds
  # (scripts/build-image.sh); before the cluster starts, which writes oci.conf only where an OCI runtime is.
  if ! command -v ch-run >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then
    log "installing charliecloud, runc and mmdebstrap (container tests)"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q charliecloud-runtime runc mmdebstrap
  fi
  command -v slurmdbd >/dev/null || bash scripts/slurm-local.sh install --dbd
  bash scripts/slurm-local.sh start multi --dbd
fi
log "ready: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null)"

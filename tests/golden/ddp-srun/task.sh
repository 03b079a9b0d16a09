#!/bin/bash
# Rendered by hpcdist: what each Slurm task runs. Per-task values ($SLURM_PROCID, $SLURM_NODEID,
# MASTER_ADDR, ...) expand here, in the task's own shell, never in the batch shell.
set -euo pipefail

# Every attempt appends to this task's log: `hpcdist attempt end` judges an attempt by its own part alone.
echo "hpcdist: attempt ${HPCDIST_ATTEMPT:-${SLURM_RESTART_COUNT:-0}} started on $(hostname) at $(date +%Y-%m-%dT%H:%M:%S)"
hpcdist_timeline=/jobs/golden/run/timeline/attempt-"${HPCDIST_ATTEMPT:-${SLURM_RESTART_COUNT:-0}}"
{ mkdir -p "$hpcdist_timeline" && printf '%s %s\n' task_start "$(date +%s.%N)" >>"$hpcdist_timeline/task-${SLURM_PROCID:-0}"; } 2>/dev/null || true

python=/opt/venv/bin/python
run_dir=/jobs/golden/run
resume=()
if [ "${HPCDIST_ATTEMPT:-${SLURM_RESTART_COUNT:-0}}" -gt 0 ]; then
    resume=(--resume)
fi
exec "$python" -m train --backend ddp --run-dir "$run_dir" \
    --precision fp32 \
    ${resume[@]+"${resume[@]}"} --epochs 1 --batch-size 64

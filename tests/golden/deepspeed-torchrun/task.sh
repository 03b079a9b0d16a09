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
# Assigned first: under set -e a failing `hpc env` then stops the task (inside eval "$(...)" it would not).
# It names the node that hosts torchrun's rendezvous (rdzv_conf=is_host=0|1): that node finding MASTER_PORT
# taken then fails at once, where torch's own guess would join the port's holder and wait out the rendezvous.
rendezvous=$("$python" -m hpc env --shell)
eval "$rendezvous"
# Slurm signals every process of the step: torchrun's agent ignores USR1 (its default action would kill
# it) while the trainer installs its own handler and checkpoints.
trap '' USR1
exec "$python" -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node 2 \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    ${rdzv_conf:+--rdzv_conf "$rdzv_conf"} \
    -m train --backend deepspeed --run-dir "$run_dir" \
    --deepspeed-config /jobs/golden/deepspeed.json \
    ${resume[@]+"${resume[@]}"} --epochs 1 --batch-size 64

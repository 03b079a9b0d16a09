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
rendezvous=$("$python" -m hpc env --shell)
eval "$rendezvous"
# DeepSpeed's per-node launcher, not its ssh runner: srun already put one task on each node.
world_info=$("$python" -m hpc hostfile --from-slurm --world-info --slots 2)
# The launcher exports neither; hpc.ranks reads them for local world size and node rank.
export LOCAL_WORLD_SIZE=2 GROUP_RANK="$SLURM_NODEID"
# Slurm signals every process of the step: the launcher ignores USR1 (its default action would kill
# it) while the trainer installs its own handler and checkpoints.
trap '' USR1
exec "$python" -m deepspeed.launcher.launch --world_info="$world_info" --node_rank="$SLURM_NODEID" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    --module train --backend deepspeed --run-dir "$run_dir" \
    --deepspeed-config /jobs/golden/deepspeed.json \
    ${resume[@]+"${resume[@]}"} --epochs 1 --batch-size 64

#!/bin/bash
# Rendered by hpcdist: run by the batch shell after the job step, on both submit paths (job.sbatch and
# submitit's teardown). Usage: requeue.sh STEP_STATUS
#
# The trainer's rank 0 leaves run/preempted once every rank has checkpointed after a preemption or
# time-limit signal. The marker, not the step's exit status, decides: ranks exit 75 a moment apart and
# srun --kill-on-bad-exit then kills the slower ones, so the step itself may end 75, 15 or 137.
set -uo pipefail

status=${1:-0}
marker=/jobs/golden/run/preempted
restarts=${SLURM_RESTART_COUNT:-0}
# An array task is requeued by its own JOBID_TASKID; a plain job by its id.
job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
job=${job:-$SLURM_JOB_ID}

if [ -e "$marker" ]; then
    rm -f "$marker"
    if [ "$restarts" -lt 3 ]; then
        echo "hpcdist: every rank checkpointed; requeueing job $job (restart $((restarts + 1)) of 3)"
        scontrol requeue "$job"
        exit 0
    fi
    echo "hpcdist: every rank checkpointed, but job $job has used its 3 requeue(s); resubmit with --resume to go on" >&2
    exit 75
fi
exit "$status"

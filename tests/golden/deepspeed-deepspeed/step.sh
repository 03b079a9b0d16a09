#!/bin/bash
# Rendered by hpcdist: one step of the job on 2 node(s) of the allocation, run by the batch shell
# (job.sbatch's first step, and requeue.sh's relaunches after a failure). Usage: step.sh [EXCLUDE [NODES]]
# EXCLUDE (a Slurm nodelist) keeps a relaunch off the nodes that failed in this allocation; NODES, fewer than
# 2, is an elastic relaunch's (--elastic: the trainer keeps the global batch on fewer ranks).
set -uo pipefail
exclude=${1:-}
nodes=${2:-2}
# Expanded below as ${relaunch[@]+...}: bash before 4.4 (RHEL 7's 4.2) calls an empty array unbound under
# set -u and would end the step before srun.
relaunch=()
if [ -n "$exclude" ]; then
    # A dead node's step lingers until Slurm declares the node down (SlurmdTimeout, minutes later) and keeps
    # its CPUs on the live nodes: the relaunch shares them rather than wait.
    relaunch=(--exclude="$exclude" --overlap)
fi
# A rank that dies ends the whole step (--kill-on-bad-exit) instead of leaving the others hung in a
# collective until the time limit.
exec srun --kill-on-bad-exit=1 --nodes="$nodes" --ntasks=$((nodes * 1)) \
    --ntasks-per-node=1 --cpus-per-task=8 ${relaunch[@]+"${relaunch[@]}"} \
    --open-mode=append --output=/jobs/golden/logs/task-%t.log \
    bash /jobs/golden/task.sh

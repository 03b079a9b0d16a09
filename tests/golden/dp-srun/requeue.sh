#!/bin/bash
# Rendered by hpcdist: run by the batch shell after the job step, on both submit paths (job.sbatch and
# submitit's teardown). Usage: requeue.sh STEP_STATUS
#
# `hpcdist attempt end` classifies how this attempt ended (completed, preempted, time_limit, node_failure,
# rank_crashed, hung, bad_input, code_error, cancelled, unknown), appends it to attempts.jsonl and decides:
# requeue (every rank checkpointed after a signal; at most 3); after a lost node, a killed
# rank or a hang (at most 2 in all) relaunch the step at once in this allocation on the nodes
# left (spares first), or, when they cannot fit it, retry through the queue
# without the implicated node (as a new job, which it has submitted, when that node died unseen by Slurm: requeued,
# this job would wait for Slurm to declare it down); or nothing (bad input and code errors are never retried).
set -uo pipefail
# Slurm's SIGTERM (a requeue, the time limit, a cancellation) reaches this shell too; ignoring it here, and
# in the commands below that inherit it, lets the decision finish within KillWait.
trap '' TERM

status=${1:-0}
# An array task is requeued by its own JOBID_TASKID; a plain job by its id.
job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
job=${job:-$SLURM_JOB_ID}

while :; do
    action=none exclude='' already_requeued=0 end_status=$status uses=0 next_attempt='' nodes=''
    decision=$(/opt/venv/bin/python -m hpc attempt end --job-dir /jobs/golden --step-status "$status" \
        --max-requeues 3 --max-retries 2 --nodes 1 \
        --ranks-per-task 1 --ntasks 1 \
        --signal-delay-s 120 --launcher srun) \
        && eval "$decision"
    # Both markers were acted on; a relaunched step's ranks write their own.
    rm -f /jobs/golden/run/preempted /jobs/golden/run/lost.json
    [ "$action" = relaunch ] || break
    export HPCDIST_ATTEMPT=$next_attempt HPCDIST_EXCLUDE=$exclude HPCDIST_ELASTIC_NODES=$nodes
    echo "hpcdist: relaunching the step in this allocation (retry $uses of 2)${exclude:+ without $exclude}${nodes:+ on $nodes node(s)}"
    echo "hpcdist: attempt ${HPCDIST_ATTEMPT:-${SLURM_RESTART_COUNT:-0}} started on $(hostname) at $(date +%Y-%m-%dT%H:%M:%S)"
    # A relaunch's start-up begins here, not at its tasks' start: its waterfall shows the srun launch, and goodput
    # counts the allocation's time from here.
    hpcdist_timeline=/jobs/golden/run/timeline/attempt-"${HPCDIST_ATTEMPT:-${SLURM_RESTART_COUNT:-0}}"
    { mkdir -p "$hpcdist_timeline" && printf '%s %s\n' setup_done "$(date +%s.%N)" >>"$hpcdist_timeline/batch"; } 2>/dev/null || true
    status=0
    bash /jobs/golden/step.sh "$exclude" "$nodes" || status=$?
done

case "$action" in
    resubmit)
        # `hpcdist attempt end` submitted the run again as a new job (every waiter follows it): this one ends.
        echo "hpcdist: job $job goes on as a new job${exclude:+ without $exclude} (retry $uses of 2)"
        exit "$end_status"
        ;;
    requeue|retry)
        # Hold the requeued job, keep it off the excluded nodes, and move its begin time to 2 s from now:
        # Slurm pushes a requeued job's start ~120 s ahead unless its begin time is already in the future
        # when the old run finishes completing (a waiting `hpcdist submit --wait` then starts it at once).
        if [ "$already_requeued" = 0 ] && ! scontrol requeuehold "$job"; then
            # Slurm requeued it itself meanwhile (a node failure): only the update below is left to do.
            already_requeued=1
        fi
        scontrol update JobId="$job" StartTime=now+2 ${exclude:+ExcNodeList="$exclude"} \
            || echo "hpcdist: could not update job $job (start time, excluded nodes)" >&2
        # A held job never starts, and no waiter releases it: a release the controller missed (restarting, failing
        # over) is tried again, and one never taken is said, with the command that starts the job.
        released=$already_requeued
        for wait_s in 1 2 0; do
            [ "$released" = 1 ] || { scontrol release "$job" && released=1; } || sleep "$wait_s"
        done
        [ "$released" = 1 ] || echo "hpcdist: job $job stays held, as scontrol release failed; start it with: scontrol release $job" >&2
        if [ "$action" = requeue ]; then
            echo "hpcdist: requeueing job $job to resume from its checkpoint (restart $uses of 3)"
        else
            echo "hpcdist: retrying job $job (retry $uses of 2)${exclude:+ without $exclude}"
        fi
        exit 0
        ;;
esac
if [ "$already_requeued" = 1 ]; then
    # Slurm requeued the job itself (a node failure), but hpcdist's policy says no further attempt.
    echo "hpcdist: cancelling job $job, which Slurm requeued: no retry is left" >&2
    scancel "$job"
fi
exit "$end_status"

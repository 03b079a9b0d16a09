# shellcheck shell=bash
# Rendered by hpcdist for cluster profile golden-site: sourced by job.sbatch before srun, so
# every task inherits what it exports.
# The batch shell (no step id yet) stamps its start and, at the end of this file, its set-up's end.
if [ -z "${SLURM_STEP_ID:-}" ]; then
    hpcdist_timeline=/jobs/golden/run/timeline/attempt-"${SLURM_RESTART_COUNT:-0}"
    { mkdir -p "$hpcdist_timeline" && printf '%s %s\n' batch_start "$(date +%s.%N)" >>"$hpcdist_timeline/batch"; } 2>/dev/null || true
fi
module load cuda/12.1
# The profile's setup lines, verbatim: they are the site admin's shell by design.
ulimit -n 65536
export NCCL_DEBUG=WARN
export NCCL_IB_HCA=mlx5_0,mlx5_1
export NCCL_SOCKET_IFNAME=ib0
export PYTHONPATH=/src/hpcdist"${PYTHONPATH:+:$PYTHONPATH}"
export HPCDIST_PYTHON=/opt/venv/bin/python
# A marker left by an earlier run was acted on already; this run's ranks write their own.
if [ -z "${SLURM_STEP_ID:-}" ]; then
    rm -f /jobs/golden/run/preempted
    { mkdir -p "$hpcdist_timeline" && printf '%s %s\n' setup_done "$(date +%s.%N)" >>"$hpcdist_timeline/batch"; } 2>/dev/null || true
    # Slurm's SIGTERM at the time limit, a cancellation or a node failure would end the batch shell before
    # requeue.sh records the attempt; with a handler it waits for the step and goes on (KillWait later,
    # SIGKILL ends it anyway). A handler, unlike an ignored signal, is not inherited by srun and the ranks.
    trap 'echo "hpcdist: the batch shell got SIGTERM" >&2' TERM
    # Where this attempt's part of the batch log (which every attempt appends to) begins.
    echo "hpcdist: attempt ${SLURM_RESTART_COUNT:-0} started on $(hostname) at $(date +%Y-%m-%dT%H:%M:%S)"
fi

# shellcheck shell=bash
# Rendered by hpcdist for cluster profile golden-site: sourced by job.sbatch before srun, so
# every task inherits what it exports.
# sbatch (and the local runner) pass the submitting shell's environment on: a launcher's variables there, from a
# torchrun or a debugging session, would make every task rank 0 of a world of one (RANK=0 WORLD_SIZE=1) or each
# node its own rendezvous (MASTER_ADDR=localhost). Slurm and the job's launcher give the ranks theirs; the
# profile's env below may still set one.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE MASTER_ADDR MASTER_PORT
# The batch shell (no step id yet) numbers this attempt (Slurm's restart count, or past it when earlier
# allocations relaunched steps), stamps its start and, at the end of this file, its set-up's end.
if [ -z "${SLURM_STEP_ID:-}" ]; then
    # Slurm's SIGTERM at the time limit, a cancellation or a node failure would end the batch shell before
    # requeue.sh records the attempt; with a handler it waits for the step and goes on (KillWait later,
    # SIGKILL ends it anyway). Set first: numbering the attempt below starts python, long enough for the
    # signal to come. A handler, unlike an ignored signal, is not inherited by srun and the ranks.
    trap 'echo "hpcdist: the batch shell got SIGTERM" >&2' TERM
    HPCDIST_ATTEMPT=$(/opt/venv/bin/python -m hpc attempt number --job-dir /jobs/golden) \
        || HPCDIST_ATTEMPT=${SLURM_RESTART_COUNT:-0}
    export HPCDIST_ATTEMPT
    hpcdist_timeline=/jobs/golden/run/timeline/attempt-"${HPCDIST_ATTEMPT:-${SLURM_RESTART_COUNT:-0}}"
    { mkdir -p "$hpcdist_timeline" && printf '%s %s\n' batch_start "$(date +%s.%N)" >>"$hpcdist_timeline/batch"; } 2>/dev/null || true
fi
# The profile's module loads and setup lines (verbatim: the site admin's shell by design) run under job.sbatch's
# set -euo pipefail on every path (submitit's batch script and the local runner set no option), so that the
# first to fail stops the job here, before its step, in one line; the caller's options come back after.
hpcdist_options=$(set +o)
hpcdist_profile=golden-site
set -euo pipefail
trap 'echo "hpcdist: a module load or setup line of cluster profile $hpcdist_profile failed (status $?): fix it in the profile or run it by hand to see why" >&2' ERR
module load cuda/12.1
ulimit -n 65536
trap - ERR
eval "$hpcdist_options"
export NCCL_DEBUG=WARN
export NCCL_IB_HCA=mlx5_0,mlx5_1
export NCCL_SOCKET_IFNAME=ib0
export PYTHONPATH=/src/hpcdist"${PYTHONPATH:+:$PYTHONPATH}"
export HPCDIST_PYTHON=/opt/venv/bin/python
# A marker left by an earlier run was acted on already; this run's ranks write their own.
if [ -z "${SLURM_STEP_ID:-}" ]; then
    rm -f /jobs/golden/run/preempted /jobs/golden/run/lost.json
    { mkdir -p "$hpcdist_timeline" && printf '%s %s\n' setup_done "$(date +%s.%N)" >>"$hpcdist_timeline/batch"; } 2>/dev/null || true
    echo "hpcdist: attempt ${HPCDIST_ATTEMPT:-${SLURM_RESTART_COUNT:-0}} started on $(hostname) at $(date +%Y-%m-%dT%H:%M:%S)"
    # The ranks ask a silent node's slurmd whether the node is alive (train/watchdog.py). A controller that does
    # not answer (restarting, failing over) leaves them Slurm's default port: under job.sbatch's set -e and
    # pipefail its failure would otherwise end the job here, before its step and unrecorded.
    HPCDIST_SLURMD_PORT=$(scontrol show config 2>/dev/null | awk '$1 == "SlurmdPort" {print $3}') || true
    export HPCDIST_SLURMD_PORT
    # Every step's rank 0 runs here, on the batch host. Where another program holds the rendezvous port the job id
    # derives, the ranks get one no job id derives instead (hpc/ports.py); a failure here leaves them the derived one.
    if port=$(/opt/venv/bin/python -m hpc env --rendezvous-port) && [ -n "$port" ]; then
        export HPCDIST_MASTER_PORT=$port
    fi
    # srun waits for every node of its step, a dead one too, until Slurm declares it down (SlurmdTimeout,
    # minutes). Once a rank has named a node lost (run/lost.json), nothing more can come from it: this
    # watcher ends the batch job's srun so that requeue.sh relaunches the step now.
    # It ends with the batch shell: gone, or exited and not yet reaped (a zombie) by whoever started it.
    ( trap - TERM
      # stderr first: the batch shell gone, the redirection itself fails and would say so in the batch log.
      while read -r _ _ state _ 2>/dev/null </proc/$$/stat && [ "$state" != Z ]; do
          if [ -e /jobs/golden/run/lost.json ] && stepping=$(pgrep -s 0 -x srun); then
              sleep 1  # the survivors' own exit first, so that their logs say why
              # Only the step seen with the marker, and only while the marker stands: meanwhile requeue.sh may
              # have acted on it (removed it) and relaunched the step, whose srun is not the one to end.
              if [ -e /jobs/golden/run/lost.json ]; then
                  echo "hpcdist: $(head -c 300 /jobs/golden/run/lost.json 2>/dev/null): ending the step" >&2
                  echo "$stepping" | xargs -r kill -KILL 2>/dev/null || true
              fi
          fi
          sleep 0.5
      done ) &
fi

"""hpcdist's vocabulary: the words the CLI, the templates and the trainer share (torch-free, no imports)."""

# What trains: the trainer's backends; a job may also ask for "auto" and let hpc.plan choose.
BACKENDS = ("dp", "ddp", "deepspeed")
AUTO = "auto"
JOB_BACKENDS = (*BACKENDS, AUTO)
LAUNCHERS = ("srun", "torchrun", "deepspeed")
# Which launchers can start each backend: dp is one process owning every GPU of one node, and the
# torchrun/DeepSpeed launchers exist to start several ranks per node, which dp never has.
VALID_LAUNCHERS = {
    "dp": ("srun",),
    "ddp": ("srun", "torchrun"),
    "deepspeed": ("srun", "torchrun", "deepspeed"),
}
# Launchers that run one Slurm task per node and spawn that node's ranks themselves.
NODE_LAUNCHERS = ("torchrun", "deepspeed")
DTYPES = ("fp32", "bf16", "fp16")
PRECISIONS = (AUTO, *DTYPES)
ZERO_STAGES = (0, 1, 2, 3)
DEFAULT_ZERO_STAGE = 2
DATASETS = ("synthetic", "cifar10")
LOADERS = ("resident", "classic")
DEFAULT_JOB_NAME = "hpcdist"

# The trainer's exit statuses (docs/CONTRACTS.md); anything else is a failure.
EXIT_BAD_INPUT = 2
EXIT_STORAGE = 74  # a checkpoint could not be written (the disk full, the path read-only): sysexits' EX_IOERR
EXIT_PREEMPTED = 75  # every rank checkpointed after a preemption/time-limit signal: requeue, rerun with --resume
EXIT_HUNG = 76  # the watchdog ended a rank whose step stopped advancing
EXIT_NODE_LOST = 77  # every rank of another node vanished and its slurmd does not answer (RUN_DIR/lost.json)
EXIT_INTERRUPTED = 130  # a user's Ctrl-C (SIGINT): 128 + 2, what a shell reports for it; rerun with --resume
# What every rank checkpoints on, then exits EXIT_PREEMPTED (train/preemption.py): a job's --signal names one.
CHECKPOINT_SIGNALS = ("USR1", "TERM")
# Heartbeat phases (contract 1). Before a rank's first step there is no step time yet to judge a hang by; in the
# active phases a step time does; a final phase is written once, as the rank ends.
SETUP_PHASES = ("setup", "rendezvous", "build")
ACTIVE_PHASES = ("train", "eval", "checkpoint")
FINAL_PHASES = ("done", "stopped", "failed")
PHASES = SETUP_PHASES + ACTIVE_PHASES + FINAL_PHASES

# The job directory's layout, relative to JOB_DIR.
JOB_SBATCH = "job.sbatch"
SETUP_SH = "setup.sh"
TASK_SH = "task.sh"
REQUEUE_SH = "requeue.sh"
STEP_SH = "step.sh"
SPEC_YAML = "spec.yaml"
RANKS_TXT = "ranks.txt"
DEEPSPEED_JSON = "deepspeed.json"
HOSTFILE = "hostfile"
SUBMITTED_JSON = "submitted.json"
SUBMITIT_DIR = "submitit"
LOCAL_CONTROLLER_LOG = "submitit/controller.log"  # what the local executor's controller process says
ATTEMPTS = "attempts.jsonl"
LOGS_DIR = "logs"
TASK_LOG = "logs/task-%t.log"  # Slurm's %t: the task's index in the step
BATCH_LOG = "logs/batch-%j.out"  # Slurm's %j: the job id
RUN_DIR = "run"  # the trainer's --run-dir

# The run directory's layout, relative to RUN_DIR (written by the trainer).
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
PREEMPTED = "preempted"  # rank 0's marker: every rank checkpointed after a signal; requeue.sh acts on it
PREFLIGHT = "preflight"
HEARTBEAT = "heartbeat"  # heartbeat/node-N.json(l): one writer per node (hpc/beatfile.py)
HANG = "hang.json"
LOST = "lost.json"  # the first rank to see a peer node vanish names it; the batch shell then ends the step
ERRORS = "errors"  # errors/rank-R.json: a rank's own fatal error, for the ending to lead with
TIMELINE = "timeline"


def task_log(index: int) -> str:
    """``logs/task-3.log``: Slurm task ``index``'s log, relative to the job directory."""
    return TASK_LOG.replace("%t", str(index))


def batch_log(job_id: str) -> str:
    """``logs/batch-4242.out``: the batch script's log, relative to the job directory."""
    return BATCH_LOG.replace("%j", str(job_id))

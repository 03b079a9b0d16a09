"""The facts one attempt's ending is read from, and the readers of the logs they come from.

    ev = Evidence(attempt=0, step_status=137, batch_log=..., task_logs={1: ...})   # what classify() reads
    task_ends(batch_log)      # srun's "srun: error: n2: task 1: Killed" lines
    attempt_segment(log, 2)   # attempt 2's part of a batch or task log that every attempt appends to

Everything here is pure: hpc/failures/gather.py reads the job directory and Slurm into an ``Evidence``.
"""

from __future__ import annotations

import re
import signal as signals
from dataclasses import dataclass, field
from typing import Any, Mapping

from hpc.runfiles import RankError

# srun's report of a task that ended badly: ``srun: error: n2: task 1: Killed``.
_SRUN_END = re.compile(r"^srun: error: (\S+): tasks? (\d+)(?:[-,]\d+)*: (.+)$", re.M)
_SRUN_NODE_FAIL = re.compile(r"^srun: error: (?:Node failure on ([^\s:]+)"
                             r"|Task launch for \S+ failed on node ([^\s:]+))", re.M)
# slurmstepd's banner when Slurm itself ends the job: ``*** JOB 42 ON n1 CANCELLED AT ... DUE TO TIME LIMIT ***``.
_STEPD_CANCEL = re.compile(r"\*\*\* (?:JOB|STEP) \S+ ON (\S+) CANCELLED AT \S+"
                           r"(?: DUE TO ([A-Z ]+?))?(?:,[^*]*)? \*\*\*")
_EXIT_CODE = re.compile(r"Exited with exit code (\d+)")
# A line a rank wrote as its own fatal error: ours, argparse's, or the last line of a Python traceback.
_OWN_ERROR = re.compile(r"^(?:hpcdist-train|python -m train|\S+\.py): error: (.+)$")
_EXCEPTION = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Failure)):?(?: (.*))?$")
# Launchers that report a child's death: torchrun's "Root Cause" block and DeepSpeed's launcher.
_TORCHRUN_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)", re.M)
_TORCHRUN_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.M)
_DEEPSPEED_EXIT = re.compile(r"exits with return code = (-?\d+)")
_DEEPSPEED_LOCAL_RANK = re.compile(r"'--local_rank=(\d+)'")
_STOPPED = re.compile(r"stopped by (SIG[A-Z0-9]+) at step (\d+)")
# What a rank says when a peer, not itself, is the problem: a broken or timed-out collective.
_SYMPTOM = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe|[Tt]imed out|timeout|DistNetworkError|"
                      r"DistBackendError|NCCL communicator was aborted|ProcessGroupGloo|recvBytes|sendBytes|"
                      r"ChildFailedError|SignalException|Terminated|Socket Timeout|connection refused", re.I)
# A network error that is this host's own: torchrun's agent on the rendezvous host cannot listen on MASTER_PORT.
_OWN_NETWORK = re.compile(r"EADDRINUSE|address already in use", re.I)
# Launcher noise that is never a rank's own error.
_NOISE = ("ChildFailedError", "SignalException", "torch.distributed.elastic")


@dataclass(frozen=True)
class TaskEnd:
    """srun's line about one task that ended badly."""

    task: int
    node: str
    how: str

    @property
    def exit_code(self) -> int | None:
        m = _EXIT_CODE.search(self.how)
        return int(m.group(1)) if m else None

    @property
    def signal(self) -> int | None:
        """The signal that killed the task: srun names it (``Killed``), or a launcher's 128+N status says it."""
        named = {"Killed": signals.SIGKILL, "Terminated": signals.SIGTERM, "Segmentation fault": signals.SIGSEGV,
                 "Aborted": signals.SIGABRT, "Bus error": signals.SIGBUS, "Interrupt": signals.SIGINT,
                 "Floating point exception": signals.SIGFPE, "Illegal instruction": signals.SIGILL,
                 "User defined signal 1": signals.SIGUSR1, "User defined signal 2": signals.SIGUSR2}
        for name, sig in named.items():
            if self.how.startswith(name):
                return int(sig)
        code = self.exit_code
        if code is None or code <= 128:
            return None
        # DeepSpeed's launcher exits with its child's negative status: -9 arrives as 247.
        return code - 128 if code < 193 else 256 - code


@dataclass(frozen=True)
class Evidence:
    """Everything the classifier may look at for one attempt; every field optional but the attempt number."""

    attempt: int
    step_status: int | None = None               # the srun step's exit status in the batch shell
    batch_log: str = ""                           # this attempt's part of logs/batch-JOBID.out
    task_logs: Mapping[int, str] = field(default_factory=dict)   # task -> tail of logs/task-T.log
    errors: tuple[RankError, ...] = ()           # this attempt's RUN_DIR/errors/rank-R.json
    preempted: bool = False                       # RUN_DIR/preempted exists
    hang: Mapping[str, Any] | None = None         # this attempt's RUN_DIR/hang.json
    lost: Mapping[str, Any] | None = None         # this attempt's RUN_DIR/lost.json: a node the ranks saw vanish
    job_state: str = ""                           # Slurm's: RUNNING, COMPLETING, NODE_FAIL, TIMEOUT, CANCELLED, ...
    job_reason: str = ""                          # scontrol's Reason= (TimeLimit, NodeDown, ...)
    down_nodes: frozenset[str] = frozenset()      # nodes Slurm now calls down/drained/failing
    ranks_per_task: int = 1
    launcher: str = "srun"                        # which launcher's own report of a dead child to believe
    time_left_s: int | None = None                # the job's time limit minus its run time, when the step ended
    warning_s: int = 0                            # how long before the time limit Slurm signals (--signal X@N)
    checkpoint_step: int | None = None            # the newest complete checkpoint (what a retry resumes from)
    seen_step: int | None = None                  # the newest step any rank reported
    snapshots: Mapping[str, int] = field(default_factory=dict)  # node -> newest snapshot in its memory


# What the batch shell saw when the step ended besides the logs: Slurm's view, and the ranks' hang.json and
# lost.json, which the next attempt replaces. The attempt's line keeps it, so that the ending can be classified
# again later from that and a copy of the logs (scripts/capture-failure.py; the drill's cells in tests/data/failures/).
CONTEXT = ("step_status", "job_state", "job_reason", "down_nodes", "ranks_per_task", "launcher", "time_left_s",
           "warning_s", "checkpoint_step", "seen_step", "preempted", "hang", "lost")
# hang.json's every rank's stacks are for people; the rules read none of them.
_UNREAD = ("stacks", "groups")


def context(ev: Evidence) -> dict[str, Any]:
    """``ev``'s CONTEXT as JSON values (the down nodes sorted, the hang without its stacks)."""
    out = {k: sorted(v) if isinstance(v := getattr(ev, k), frozenset) else v for k in CONTEXT}
    if out["hang"]:
        out["hang"] = {k: v for k, v in out["hang"].items() if k not in _UNREAD}
    return out


def with_context(attempt: int, seen: Mapping[str, Any], **files: Any) -> Evidence:
    """The Evidence of ``attempt`` from its context (as ``context`` gave it; other keys ignored) and its logs'
    fields (batch_log, task_logs, errors)."""
    values = {k: frozenset(v) if k == "down_nodes" else v for k, v in seen.items() if k in CONTEXT}
    return Evidence(attempt=attempt, **values, **files)


def task_ends(batch_log: str) -> list[TaskEnd]:
    """srun's reports of tasks that ended badly, in the order srun printed them."""
    return [TaskEnd(int(m.group(2)), m.group(1), m.group(3).strip()) for m in _SRUN_END.finditer(batch_log)]


def failed_nodes(batch_log: str) -> list[str]:
    """Nodes that Slurm said failed under this attempt (srun's "Node failure on nX", slurmstepd's banner)."""
    return list(dict.fromkeys(m.group(1) or m.group(2) for m in _SRUN_NODE_FAIL.finditer(batch_log)))


def stepd_reasons(batch_log: str) -> list[str]:
    """slurmstepd's "CANCELLED ... DUE TO X" reasons (TIME LIMIT, NODE FAILURE, JOB REQUEUE, PREEMPTION), or
    "CANCELLED" for a plain scancel."""
    return [(m.group(2) or "CANCELLED").strip() for m in _STEPD_CANCEL.finditer(batch_log)]


def last_error_line(log: str) -> str | None:
    """The last line in a task log that a rank wrote as its own fatal error; launcher blocks are skipped.

    ``hpcdist-train: error: X`` (bad input) gives ``X``; a traceback gives its last line (``ValueError: ...``).
    torchrun's ChildFailedError report and DeepSpeed's launcher lines are what *noticed* the failure, not it.
    """
    found = None
    for raw in log.splitlines():
        line = re.sub(r"^\[(?:rank|default)\d+\]:\s?", "", raw.strip())  # torchrun's --tee prefixes
        if not line or any(n in line for n in _NOISE):
            continue
        if m := _OWN_ERROR.match(line):
            found = m.group(1).strip()
        elif (m := _EXCEPTION.match(line)) and m.group(1).split(".")[-1] not in ("SystemExit", "KeyboardInterrupt"):
            found = line
    return found


def launcher_child(log: str, task: int, per: int, launcher: str,
                   task_exit: int | None) -> tuple[int | None, int | None]:
    """(rank, exit status) of the child ``launcher`` reported dead: torchrun's root cause, DeepSpeed's exit.

    Only the job's own launcher is read, and only where the task's exit status bears it out, since a rank
    writes to the same log and can print either report: torchrun exits 1 after a child failed and prints its
    root cause last; DeepSpeed's launcher exits with its child's status, so its line must match the task's.
    A negative status is the signal that killed the child (-9: SIGKILL). DeepSpeed's launcher names the child
    only by its command line, whose ``--local_rank=L`` is the rank ``task * per + L`` of this node's ``per``.
    """
    if launcher == "torchrun":
        root = log.rfind("Root Cause")
        if root < 0 or task_exit in (None, 0):
            return None, None
        block = log[root:]
        rank, code = _TORCHRUN_RANK.search(block), _TORCHRUN_EXIT.search(block)
        return int(rank.group(1)) if rank else None, int(code.group(1)) if code else None
    if launcher == "deepspeed":
        exits = [m for line in log.splitlines() if (m := _DEEPSPEED_EXIT.search(line))]
        if not exits or task_exit is None or int(exits[-1].group(1)) % 256 != task_exit % 256:
            return None, None
        local = _DEEPSPEED_LOCAL_RANK.search(exits[-1].string)
        return task * per + int(local.group(1)) if local else None, int(exits[-1].group(1))
    return None, None


def attempts_started(log: str) -> dict[int, int]:
    """attempt -> where in ``log`` its ``hpcdist: attempt N started`` line (setup.sh, requeue.sh, task.sh) is."""
    return {int(m.group(1)): m.start() for m in re.finditer(r"^hpcdist: attempt (\d{1,9}) started", log, re.M)}


def attempt_segment(log: str, attempt: int) -> str:
    """This attempt's part of a log that every attempt appends to (the batch log, a task log): from its own
    ``hpcdist: attempt N started`` line (setup.sh, task.sh) to the next attempt's, else after the previous
    attempt's ``ended`` line; nothing when an earlier attempt started after that (a task this attempt did not run)."""
    starts = attempts_started(log)
    if attempt in starts:
        later = [pos for n, pos in starts.items() if n > attempt and pos > starts[attempt]]
        return log[starts[attempt]:min(later) if later else len(log)]
    ends = [(int(m.group(1)), m.end()) for m in re.finditer(r"^hpcdist: attempt (\d+) ended.*$", log, re.M)]
    begin = max((pos for n, pos in ends if n < attempt), default=0)
    if any(pos >= begin for n, pos in starts.items() if n < attempt):
        return ""
    return log[begin:next((pos for n, pos in ends if n == attempt and pos > begin), len(log))]


def stopped_by(text: str) -> tuple[str, int] | None:
    """(signal name, step) from a rank's "stopped by SIGUSR1 at step 40" (the trainer's checkpointed stop)."""
    m = _STOPPED.search(text)
    return (m.group(1), int(m.group(2))) if m else None


def is_symptom(error: RankError | str) -> bool:
    """A failure that reports a peer's death or a timed-out collective rather than this rank's own bug."""
    text = error.error if isinstance(error, RankError) else error
    if (isinstance(error, RankError) and error.kind == "bad_input") or _OWN_NETWORK.search(text):
        return False
    return bool(_SYMPTOM.search(text))

"""Classify how each attempt of a job ended, decide whether to requeue or retry it, and keep one line per attempt.

    python -m hpc attempt end --job-dir DIR --step-status 137 --max-requeues 3 --max-retries 2 --nodes 2

The classifier (``classify``) and the policy (``decide``) are pure: every fact they use arrives in an
``Evidence`` value. ``gather`` (inside the job, after the step) and ``from_sacct`` (afterwards, for an attempt
whose batch shell died) collect those facts; ``append`` writes JOB_DIR/attempts.jsonl (docs/CONTRACTS.md,
contract 2). Nothing here imports torch: the trainer calls ``record_rank_error`` from its top-level except.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal as signals
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpc import checkpoints, fileio, jobfiles, ranks, shown
from hpc.vocab import (
    ATTEMPTS,
    CHECKPOINTS,
    EXIT_BAD_INPUT,
    EXIT_HUNG,
    EXIT_PREEMPTED,
    EXIT_STORAGE,
    HANG,
    HEARTBEAT,
    LOGS_DIR,
    LOST,
    METRICS,
    RUN_DIR,
    SETUP_PHASES,
    TASK_LOG,
    batch_log,
    task_log,
)
from hpc.vocab import PREEMPTED as MARKER

ENDINGS = ("completed", "preempted", "time_limit", "node_failure", "rank_crashed", "hung", "bad_input",
           "storage", "code_error", "cancelled", "unknown")
ACTIONS = ("requeue", "relaunch", "retry", "resubmit", "none")
# Endings worth another attempt on other nodes (from the newest checkpoint), and those that resume where
# every rank checkpointed together.
RETRIED = ("node_failure", "rank_crashed", "hung")
REQUEUED = ("preempted", "time_limit")
ERRORS = "errors"          # RUN_DIR/errors/rank-R.json: a rank's own fatal error (record_rank_error)
# What each field of the files read here must be; a field of another type is damage (docs/CONTRACTS.md).
ATTEMPT_FIELDS = {"attempt": int, "job_id": str, "started": str, "ended": str, "ending": str, "rank": int | None,
                  "node": str | None, "detail": str | None, "exit_code": int | None, "signal": int | None,
                  "step": int | None, "action": str, "excluded": list, "reason": str | None,
                  "seen_step": int | None, "source": str}
RANK_ERROR_FIELDS = {"rank": int, "node": str, "attempt": int, "time": float, "kind": str, "error": str,
                     "exit_code": int | None}
HANG_FIELDS = {"rank": int | None, "node": str | None, "since": float, "step": int | None, "phase": str,
               "attempt": int}
LOST_FIELDS = {"node": str, "ranks": list, "since": float, "step": int | None, "declared_by": int, "attempt": int}
MAX_ATTEMPT = 1 << 20
MAX_UNIX_TIME = 2.0**36   # the year 4147: a later time is damage
# Node states in which Slurm would not start the job there.
UNUSABLE = ("down", "drain", "drng", "drained", "draining", "fail", "failing", "maint", "no_respond",
            "not_responding", "future", "unknown", "inval", "reboot", "power_down", "powered_down", "powering_down")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

# srun's report of a task that ended badly: ``srun: error: n2: task 1: Killed``.
_SRUN_END = re.compile(r"^srun: error: (\S+): tasks? (\d+)(?:[-,]\d+)*: (.+)$", re.M)
_SRUN_NODE_FAIL = re.compile(r"^srun: error: (?:Node failure on (\S+)|Task launch for \S+ failed on node (\S+))",
                             re.M)
# slurmstepd's banner when Slurm itself ends the job: ``*** JOB 42 ON n1 CANCELLED AT ... DUE TO TIME LIMIT ***``.
_STEPD_CANCEL = re.compile(r"\*\*\* (?:JOB|STEP) \S+ ON (\S+) CANCELLED AT \S+"
                           r"(?: DUE TO ([A-Z ]+?))?(?:,[^*]*)? \*\*\*")
_EXIT_CODE = re.compile(r"Exited with exit code (\d+)")
# logs/task-%t.log's file name, %t read back as the task's index.
_TASK_LOG = re.compile(re.escape(TASK_LOG.split("/")[-1]).replace(re.escape("%t"), r"(\d{1,7})"))
# A line a rank wrote as its own fatal error: ours, argparse's, or the last line of a Python traceback.
_OWN_ERROR = re.compile(r"^(?:hpcdist-train|python -m train|\S+\.py): error: (.+)$")
_EXCEPTION = re.compile(r"^((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit|Failure)):?(?: (.*))?$")
# Launchers that report a child's death: torchrun's "Root Cause" block and DeepSpeed's launcher.
_TORCHRUN_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: (\d+)\)", re.M)
_TORCHRUN_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)", re.M)
_TORCHRUN_HOST = re.compile(r"^\s*host\s*:\s*(\S+)", re.M)
_DEEPSPEED_EXIT = re.compile(r"exits with return code = (-?\d+)")
_DEEPSPEED_LOCAL_RANK = re.compile(r"'--local_rank=(\d+)'")
_STOPPED = re.compile(r"stopped by (SIG[A-Z0-9]+) at step (\d+)")
# What a rank says when a peer, not itself, is the problem: a broken or timed-out collective.
_SYMPTOM = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe|[Tt]imed out|timeout|DistNetworkError|"
                      r"DistBackendError|NCCL communicator was aborted|ProcessGroupGloo|recvBytes|sendBytes|"
                      r"ChildFailedError|SignalException|Terminated|Socket Timeout|connection refused", re.I)
# Launcher noise that is never a rank's own error.
_NOISE = ("ChildFailedError", "SignalException", "torch.distributed.elastic")


@dataclass(frozen=True)
class RankError:
    """One rank's own fatal error (RUN_DIR/errors/rank-R.json)."""

    rank: int
    node: str
    attempt: int
    time: float
    kind: str            # "bad_input", "storage" or "exception"
    error: str           # one line: "global batch 32 does not split ..." or "ValueError: ..."
    exit_code: int | None = None

    @property
    def symptom(self) -> bool:
        """A failure that reports a peer's death or a timed-out collective rather than this rank's own bug."""
        return self.kind != "bad_input" and bool(_SYMPTOM.search(self.error))


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
                 "Floating point exception": signals.SIGFPE, "Illegal instruction": signals.SIGILL}
        for name, sig in named.items():
            if self.how.startswith(name):
                return int(sig)
        code = self.exit_code
        # DeepSpeed's launcher exits with its child's negative status: -9 arrives as 247.
        if code is not None and code > 128 and code - 128 < 65 and code not in (EXIT_PREEMPTED, EXIT_HUNG):
            return code - 128
        if code is not None and code > 192:
            return 256 - code
        return None


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
    job_exit: str = ""                            # sacct's ExitCode "N:S"
    down_nodes: frozenset[str] = frozenset()      # nodes Slurm now calls down/drained/failing
    ranks_per_task: int = 1
    launcher: str = "srun"                        # which launcher's own report of a dead child to believe
    time_left_s: int | None = None                # the job's time limit minus its run time, when the step ended
    warning_s: int = 0                            # how long before the time limit Slurm signals (--signal X@N)
    checkpoint_step: int | None = None            # the newest complete checkpoint (what a retry resumes from)
    seen_step: int | None = None                  # the newest step any rank reported


@dataclass(frozen=True)
class Ending:
    """How one attempt ended, in the contract's words, with the first failing rank's own error line."""

    ending: str
    detail: str = ""
    rank: int | None = None
    node: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    step: int | None = None


@dataclass(frozen=True)
class Decision:
    """What to do next: requeue (resume after a checkpointed stop), relaunch (the step, at once, on the nodes
    left in this allocation), retry (through the queue, on other nodes), or none; with the nodes to keep the
    job off, and why. A relaunch and a retry both resume from the newest checkpoint."""

    action: str
    excluded: tuple[str, ...] = ()
    reason: str = ""


# ---- parsing -------------------------------------------------------------------------------------

def task_ends(batch_log: str) -> list[TaskEnd]:
    """srun's reports of tasks that ended badly, in the order srun printed them."""
    return [TaskEnd(int(m.group(2)), m.group(1), m.group(3).strip()) for m in _SRUN_END.finditer(batch_log)]


def failed_nodes(batch_log: str) -> list[str]:
    """Nodes that Slurm said failed under this attempt (srun's "Node failure on nX", slurmstepd's banner)."""
    found = [m.group(1) or m.group(2) for m in _SRUN_NODE_FAIL.finditer(batch_log)]
    return list(dict.fromkeys(found))


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
        m = _OWN_ERROR.match(line)
        if m:
            found = m.group(1).strip()
            continue
        m = _EXCEPTION.match(line)
        if m and m.group(1).split(".")[-1] not in ("SystemExit", "KeyboardInterrupt"):
            found = line
    return found


def launcher_child(log: str, task: int = 0, per: int = 1, launcher: str = "srun",
                   task_exit: int | None = None) -> tuple[int | None, int | None, str | None]:
    """(rank, exit status, host) of the child ``launcher`` reported dead: torchrun's root cause, DeepSpeed's exit.

    Only the job's own launcher is read, and only where the task's exit status bears it out, since a rank
    writes to the same log and can print either report: torchrun exits 1 after a child failed and prints its
    root cause last; DeepSpeed's launcher exits with its child's status, so its line must match the task's.
    A negative status is the signal that killed the child (-9: SIGKILL). DeepSpeed's launcher names the child
    only by its command line, whose ``--local_rank=L`` is the rank ``task * per + L`` of this node's ``per``.
    """
    nothing = (None, None, None)
    if launcher == "torchrun":
        root = log.rfind("Root Cause")
        if root < 0 or task_exit in (None, 0):
            return nothing
        block = log[root:]
        rank, code, host = _TORCHRUN_RANK.search(block), _TORCHRUN_EXIT.search(block), _TORCHRUN_HOST.search(block)
        return (int(rank.group(1)) if rank else None, int(code.group(1)) if code else None,
                host.group(1) if host else None)
    if launcher == "deepspeed":
        exits = [m for line in log.splitlines() if (m := _DEEPSPEED_EXIT.search(line))]
        if not exits or task_exit is None or int(exits[-1].group(1)) % 256 != task_exit % 256:
            return nothing
        local = _DEEPSPEED_LOCAL_RANK.search(exits[-1].string)
        return task * per + int(local.group(1)) if local else None, int(exits[-1].group(1)), None
    return nothing


def parse_rank_error(text: str) -> RankError | None:
    """A rank's error file; a field of the wrong type counts as absent, and without a rank or an error line
    there is nothing to report (None)."""
    try:
        data = jobfiles.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    data = jobfiles.well_typed(data, RANK_ERROR_FIELDS)
    if not isinstance(data.get("rank"), int) or not isinstance(data.get("error"), str):
        return None
    return RankError(data["rank"], data.get("node", ""), data.get("attempt", 0), float(data.get("time", 0.0)),
                     data.get("kind", "exception"), data["error"], data.get("exit_code"))


def parse_keyvalues(text: str) -> dict[str, str]:
    """``scontrol show job -o`` / ``show node -o``: Key=Value words (values without spaces are enough here)."""
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))


def parse_sinfo_nodes(text: str) -> dict[str, str]:
    """``sinfo -h -N -o %N|%T`` -> node -> state (lower case, without Slurm's ``*``/``~``/``#`` suffixes)."""
    out = {}
    for line in text.splitlines():
        if "|" in line:
            node, state = line.split("|", 1)
            out[node.strip()] = state.strip().lower().rstrip("*~#!%$@^-")
    return out


def attempt_segment(batch_log: str, attempt: int) -> str:
    """This attempt's part of a batch log that every attempt appends to: from its own ``hpcdist: attempt N
    started`` line (setup.sh) to the next attempt's, else after the previous attempt's ``ended`` line."""
    starts = {int(m.group(1)): m.start() for m in re.finditer(r"^hpcdist: attempt (\d+) started", batch_log, re.M)}
    if attempt in starts:
        later = [pos for n, pos in starts.items() if n > attempt and pos > starts[attempt]]
        return batch_log[starts[attempt]:min(later) if later else len(batch_log)]
    ends = [(int(m.group(1)), m.end()) for m in re.finditer(r"^hpcdist: attempt (\d+) ended.*$", batch_log, re.M)]
    begin = max((pos for n, pos in ends if n < attempt), default=0)
    own = [pos for n, pos in ends if n == attempt and pos > begin]
    return batch_log[begin:own[0] if own else len(batch_log)]


# ---- the classifier ------------------------------------------------------------------------------

def _signal_name(sig: int | None) -> str:
    try:
        return signals.Signals(sig).name if sig else ""
    except ValueError:
        return f"signal {sig}"


def _ranks(task: int, per_task: int) -> tuple[int, str]:
    first, last = task * per_task, (task + 1) * per_task - 1
    return first, (f"rank {first}" if first == last else f"ranks {first}-{last}")


def _who(rank: int | None, node: str | None, label: str | None = None) -> str:
    who = label or (f"rank {rank}" if rank is not None else "a rank")
    return f"{who} on {node}" if node else who


def _first_error(errors: Sequence[RankError]) -> RankError | None:
    """The rank that failed on its own first: its own bug before the peers that only noticed it."""
    own = [e for e in errors if not e.symptom]
    pool = own or list(errors)
    return min(pool, key=lambda e: (e.time, e.rank)) if pool else None


def classify(ev: Evidence) -> Ending:
    """The attempt's ending (one of ENDINGS) with its rank, node, exit status or signal, and detail.

    Order matters: what Slurm did to the whole job (cancel, node failure, time limit) outranks what the
    ranks saw, a hang outranks the peers that timed out waiting for the hung rank, and a rank's own error
    outranks the peers that reported it as a broken connection.
    """
    log = ev.batch_log
    ends = task_ends(log)
    reasons = stepd_reasons(log)
    state = ev.job_state.split()[0].upper() if ev.job_state else ""
    step = ev.checkpoint_step
    per = max(ev.ranks_per_task, 1)
    first_end = ends[0] if ends else None

    # slurmstepd's plain "CANCELLED AT" (no "DUE TO ...") is a user's or admin's scancel: it wins even when
    # the ranks checkpointed on the SIGTERM that came with it, or the job could never be cancelled.
    if state == "CANCELLED" or "CANCELLED" in reasons:
        return Ending("cancelled", "the job was cancelled (scancel)", step=step)

    nodes = failed_nodes(log)
    if not nodes and (state == "NODE_FAIL" or "NODE FAILURE" in reasons or ev.job_reason == "NodeDown"):
        nodes = [e.node for e in ends if e.node in ev.down_nodes] or sorted(ev.down_nodes)
    if not nodes and first_end is not None and first_end.node in ev.down_nodes:
        nodes = [first_end.node]
    # The ranks saw every rank of a node vanish and its slurmd stop answering (train/watchdog.py): Slurm has
    # not noticed yet (SlurmdTimeout), and the batch shell ended the step rather than wait for it to.
    if not nodes and ev.lost and ev.lost.get("node"):
        node, gone = ev.lost["node"], ev.lost.get("ranks") or []
        ranks = (f"rank(s) {', '.join(str(r) for r in gone[:8])}{' ...' if len(gone) > 8 else ''}" if gone
                 else "its ranks")
        return Ending("node_failure", f"node {node} lost: {ranks} vanished and its slurmd does not answer",
                      rank=gone[0] if gone and jobfiles.is_a(gone[0], int) else None, node=node, step=step)
    if nodes or state == "NODE_FAIL":
        node = nodes[0] if nodes else None
        lost = [e for e in ends if e.node == node]
        rank, label = _ranks(lost[0].task, per) if lost else (None, None)
        return Ending("node_failure", f"node {node or '?'} failed" + (f" ({label} ran there)" if label else ""),
                      rank=rank, node=node, signal=lost[0].signal if lost else None, step=step)

    # Slurm requeued the job itself (scontrol requeue, or preemption with PreemptMode=REQUEUE and no grace)
    # before the ranks could checkpoint: a preemption, resumed from the newest checkpoint; the ranks it killed
    # on the way out are not a crash to retry on other nodes.
    requeued = next((r for r in reasons if r in ("JOB REQUEUE", "PREEMPTION")), None)
    if requeued and not ev.preempted:
        since = f"the checkpoint at step {step}" if step is not None else "the start (no checkpoint)"
        return Ending("preempted", f"Slurm requeued the job ({requeued}) before the ranks could checkpoint; "
                                   f"it resumes from {since}", step=step)

    # Slurm's --signal warning (USR1@120) is sent because the time limit is near: a stop within that lead
    # time (plus Slurm's ~30 s check period) is the time limit, not a preemption.
    near_limit = ev.time_left_s is not None and ev.time_left_s <= ev.warning_s + 30
    timed_out = state == "TIMEOUT" or ev.job_reason == "TimeLimit" or "TIME LIMIT" in reasons or near_limit
    if ev.preempted:
        stopped = None
        for text in ev.task_logs.values():
            stopped = _STOPPED.search(text) or stopped
        sig = stopped.group(1) if stopped else None
        at = int(stopped.group(2)) if stopped else step
        what = "the time limit" if timed_out else "a preemption signal"
        return Ending("time_limit" if timed_out else "preempted",
                      f"every rank checkpointed at step {at} after {sig or what}",
                      signal=int(getattr(signals, sig)) if sig and hasattr(signals, sig) else None, step=at)

    if ev.hang or ev.step_status == EXIT_HUNG or any(e.exit_code == EXIT_HUNG for e in ends):
        hang = ev.hang or {}
        rank, node = hang.get("rank"), hang.get("node")
        since = hang.get("since")
        seen = hang.get("step")
        if hang.get("phase") in SETUP_PHASES:
            detail = f"{_who(rank, node)} froze during set-up ({hang['phase']}), before its first step"
        elif seen is not None:
            detail = f"{_who(rank, node)} made no progress after step {seen}"
        else:
            detail = f"{_who(rank, node)} stopped making progress"
        if since:
            detail += f" (since {time.strftime('%H:%M:%S', time.gmtime(float(since)))} UTC)"
        return Ending("hung", detail, rank=rank, node=node, exit_code=EXIT_HUNG, step=step)

    errors = [e for e in ev.errors if e.attempt == ev.attempt]
    bad = [e for e in errors if e.kind == "bad_input"]
    if bad or ev.step_status == EXIT_BAD_INPUT or (first_end and first_end.exit_code == EXIT_BAD_INPUT):
        first = _first_error(bad)
        if first:
            return Ending("bad_input", f"{_who(first.rank, first.node)}: {first.error}", rank=first.rank,
                          node=first.node, exit_code=EXIT_BAD_INPUT, step=step)
        task = first_end.task if first_end else min(ev.task_logs, default=0)
        line = last_error_line(ev.task_logs.get(task, "")) or "bad input (exit status 2)"
        rank, label = _ranks(task, per)
        return Ending("bad_input", f"{_who(rank, first_end.node if first_end else None, label)}: {line}",
                      rank=rank, node=first_end.node if first_end else None, exit_code=EXIT_BAD_INPUT, step=step)

    # A checkpoint the disk could not take (full, over quota, read-only): the rank's line names the path and
    # the free and needed bytes; retrying would only fill the same disk again.
    storage = [e for e in errors if e.kind == "storage"]
    stored = next((e for e in ends if e.exit_code == EXIT_STORAGE), None)
    if storage or ev.step_status == EXIT_STORAGE or stored:
        first = _first_error(storage)
        if first:
            return Ending("storage", f"{_who(first.rank, first.node)}: {first.error}", rank=first.rank,
                          node=first.node, exit_code=EXIT_STORAGE, step=step)
        task = stored.task if stored else min(ev.task_logs, default=0)
        rank, label = _ranks(task, per)
        line = last_error_line(ev.task_logs.get(task, "")) or "a checkpoint could not be written (exit status 74)"
        return Ending("storage", f"{_who(rank, stored.node if stored else None, label)}: {line}", rank=rank,
                      node=stored.node if stored else None, exit_code=EXIT_STORAGE, step=step)

    own = [e for e in errors if not e.symptom]
    if own:
        first = _first_error(own)
        same = len({e.error for e in own}) == 1 and len(own) > 1
        detail = f"{_who(first.rank, first.node)}: {first.error}" + (f" (the same on {len(own)} ranks)" if same else "")
        return Ending("code_error", detail, rank=first.rank, node=first.node, exit_code=first.exit_code or 1,
                      step=step)

    # A rank killed by a signal: srun names it, or the node's launcher reports its child's death.
    for end in ends:
        rank, label = _ranks(end.task, per)
        child_rank, child_code, child_host = launcher_child(ev.task_logs.get(end.task, ""), end.task, per,
                                                            ev.launcher, end.exit_code)
        sig = end.signal
        if child_code is not None and child_code < 0:
            sig = -child_code
        if child_rank is not None:
            rank, label = child_rank, None
        if sig and sig != signals.SIGTERM:
            return Ending("rank_crashed", f"{_who(rank, end.node, label)}: killed by {_signal_name(sig)}",
                          rank=rank, node=end.node, signal=sig, step=step)
        if sig == signals.SIGTERM and end is ends[-1]:
            break
        if end.exit_code not in (None, 0) and not sig:
            line = last_error_line(ev.task_logs.get(end.task, ""))
            if line and not _SYMPTOM.search(line):
                return Ending("code_error", f"{_who(rank, end.node, label)}: {line}", rank=rank, node=end.node,
                              exit_code=end.exit_code, step=step)
    if timed_out:
        return Ending("time_limit", "the time limit struck before every rank could checkpoint", step=step)
    if state == "OUT_OF_MEMORY":
        return Ending("rank_crashed", "a rank ran out of memory (the OOM killer)", signal=int(signals.SIGKILL),
                      step=step)
    if ev.step_status == 0 and not ends and state in ("", "RUNNING", "COMPLETING", "COMPLETED"):
        return Ending("completed", "", exit_code=0, step=ev.seen_step or step)
    if errors:
        first = _first_error(errors)
        return Ending("unknown", f"{_who(first.rank, first.node)}: {first.error}", rank=first.rank, node=first.node,
                      exit_code=first.exit_code, step=step)
    if first_end is not None:
        rank, label = _ranks(first_end.task, per)
        line = last_error_line(ev.task_logs.get(first_end.task, ""))
        return Ending("unknown", f"{_who(rank, first_end.node, label)}: {line or first_end.how}", rank=rank,
                      node=first_end.node, exit_code=first_end.exit_code, signal=first_end.signal, step=step)
    code = ev.step_status
    return Ending("unknown", f"the step ended with status {code}" if code is not None else "no record of how it ended",
                  exit_code=code, step=step)


# ---- the policy ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Policy:
    max_requeues: int = 3
    max_retries: int = 2
    nodes: int = 1                 # nodes the job needs


def excluded_so_far(history: Sequence[Mapping[str, Any]]) -> set[str]:
    """Every node the job's earlier attempts kept it off (exclusions accumulate)."""
    return {node for h in history for node in (h.get("excluded") or ())}


def decide(ending: Ending, history: Sequence[Mapping[str, Any]], policy: Policy,
           node_states: Mapping[str, str], allocation: Sequence[str] = ()) -> Decision:
    """Requeue a checkpointed stop, relaunch or retry a lost node/rank or a hang, never retry bad input or a bug.

    ``history`` is the job's earlier attempt lines; ``node_states`` the partition's nodes (name -> Slurm state);
    ``allocation`` the nodes this allocation holds (empty: none, as after the job has ended). A lost node, a
    killed rank or a hang is relaunched inside the allocation when its nodes can still fit the step: without
    the implicated node when a spare is left (a lost node is never used again), else on the same nodes (a
    killed rank's or a hung rank's node still answers). Otherwise it is retried through the queue. Excluded
    nodes accumulate over retries; a retry that would leave fewer usable nodes than the job needs is refused,
    saying so, rather than queued forever.
    """
    excluded = excluded_so_far(history)
    if ending.ending in REQUEUED:
        used = sum(1 for h in history if h.get("action") == "requeue")
        if used >= policy.max_requeues:
            return Decision("none", tuple(sorted(excluded)),
                            f"the job has used its {policy.max_requeues} requeue(s); resubmit with --resume to go on")
        return Decision("requeue", tuple(sorted(excluded)),
                        f"requeue {used + 1} of {policy.max_requeues}: resume from the checkpoint")
    if ending.ending not in RETRIED:
        why = {"bad_input": "bad input is never retried: fix it and resubmit",
               "storage": "a storage failure is not retried: free space (or fix the path) and resubmit with --resume",
               "code_error": "an error in the training code is never retried: fix it and resubmit",
               "completed": "", "cancelled": "cancelled by request",
               "unknown": "an ending hpcdist cannot classify is not retried"}
        return Decision("none", tuple(sorted(excluded)), why.get(ending.ending, ""))
    used = sum(1 for h in history if h.get("action") in ("retry", "relaunch", "resubmit"))
    if used >= policy.max_retries:
        return Decision("none", tuple(sorted(excluded)),
                        f"the job has used its {policy.max_retries} retry(ies) (--max-retries)")
    since = (f" from the checkpoint at step {ending.step}" if ending.step is not None
             else " from the start (no checkpoint)")
    wanted = excluded | ({ending.node} if ending.node else set())
    # In place only on a node that still answers and has not failed this job before: twice is a bad node.
    again = any(h.get("node") == ending.node for h in history)
    for keep_off in (wanted, excluded if ending.ending != "node_failure" and not again else None):
        left = [n for n in allocation if keep_off is not None and n not in keep_off]
        if allocation and keep_off is not None and len(left) >= policy.nodes:
            where = ", ".join(left[:policy.nodes])
            return Decision("relaunch", tuple(sorted(keep_off)),
                            f"retry {used + 1} of {policy.max_retries}: relaunched in the allocation on {where}{since}")
    usable = [n for n, s in node_states.items()
              if n not in wanted and s.lower().split("+")[0].rstrip("*~#!%$@^-") not in UNUSABLE]
    if node_states and len(usable) < policy.nodes:
        return Decision("none", tuple(sorted(excluded)),
                        f"not retried: excluding {', '.join(sorted(wanted))} leaves {len(usable)} usable node(s) "
                        f"({', '.join(sorted(usable)) or 'none'}) for a job that needs {policy.nodes}")
    where = f" without {', '.join(sorted(wanted))}" if wanted else ""
    return Decision("retry", tuple(sorted(wanted)),
                    f"retry {used + 1} of {policy.max_retries} through the queue{where}{since}")


# ---- records -------------------------------------------------------------------------------------

def record(ending: Ending, decision: Decision, *, attempt: int, job_id: str, started: str, ended: str,
           source: str, seen_step: int | None = None) -> dict[str, Any]:
    """One attempts.jsonl line (contract 2), plus ``reason`` (why the action), ``seen_step`` and ``source``."""
    return {"attempt": attempt, "job_id": job_id, "started": started, "ended": ended, "ending": ending.ending,
            "rank": ending.rank, "node": ending.node, "detail": ending.detail, "exit_code": ending.exit_code,
            "signal": ending.signal, "step": ending.step, "action": decision.action,
            "excluded": list(decision.excluded), "reason": decision.reason, "seen_step": seen_step,
            "source": source}


def parse_attempts(text: str) -> list[dict[str, Any]]:
    """attempts.jsonl's lines; a torn line, or one without an attempt number and an ending or with a field of
    the wrong type, is skipped: every reader may then index what contract 2 promises."""
    return [a for a in jobfiles.json_lines(text)
            if jobfiles.well_typed(a, ATTEMPT_FIELDS) == a and isinstance(a.get("attempt"), int)
            and isinstance(a.get("ending"), str) and 0 <= a["attempt"] <= MAX_ATTEMPT]


def load(job_dir: Path) -> list[dict[str, Any]]:
    """The job's attempt lines in attempt order (a line added afterwards from accounting may come last)."""
    try:
        text = jobfiles.read_text(Path(job_dir) / ATTEMPTS)
    except (OSError, jobfiles.Damaged):
        return []
    return sorted(parse_attempts(text), key=lambda a: a["attempt"])


def append(job_dir: Path, line: Mapping[str, Any]) -> bool:
    """Add an attempt's line unless that attempt already has one (the batch shell and a later ``status`` may
    both try); False when it was there already. A lock makes check-and-append one step."""
    path = Path(job_dir) / ATTEMPTS
    # Never through a symbolic link, never blocking on a FIFO: what is there must be the file it reads.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise jobfiles.Damaged(f"{path} is not a regular file; move it away")
    with os.fdopen(fd, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if any(a["attempt"] == line["attempt"] for a in parse_attempts(f.read())):
            return False
        f.write(json.dumps(dict(line), sort_keys=False) + "\n")
        f.flush()
    return True


def summary_line(a: Mapping[str, Any]) -> str:
    """``attempt 0: rank_crashed, rank 1 on n2: killed by SIGKILL -> retry without n2 from step 20``."""
    text = f"attempt {a['attempt']}: {a['ending']}"
    if a.get("detail"):
        text += f": {a['detail']}"
    if a.get("action") and a["action"] != "none":
        text += f" -> {a.get('reason') or a['action']}"
    elif a.get("reason") and a.get("ending") not in ("completed",):
        text += f" ({a['reason']})"
    return shown.line(text, limit=2000)


def root_cause(attempts: Sequence[Mapping[str, Any]]) -> str | None:
    """The first failing rank's own error line of the newest attempt that failed, or None."""
    for a in reversed(attempts):
        if a.get("ending") not in ("completed", "preempted", "cancelled") and a.get("detail"):
            return shown.line(a["detail"], limit=2000)
    return None


# ---- gathering evidence (side effects) -----------------------------------------------------------

def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(list(argv), 1, "", str(exc))


def _read(path: Path, limit: int = 262144) -> str:
    return jobfiles.tail_text(path, limit)


def read_errors(run_dir: Path) -> tuple[RankError, ...]:
    folder = Path(run_dir) / ERRORS
    if not folder.is_dir():
        return ()
    found = (parse_rank_error(_read(p, 65536)) for p in sorted(jobfiles.folder(folder, "rank-*.json")))
    return tuple(e for e in found if e is not None)


def read_hang(run_dir: Path, attempt: int) -> dict[str, Any] | None:
    data = jobfiles.json_object(Path(run_dir) / HANG, 1 << 20)
    if data is None:
        return None
    data = jobfiles.well_typed(data, HANG_FIELDS)
    # A time the clock cannot show is as good as none.
    if "since" in data and not 0 <= data["since"] <= MAX_UNIX_TIME:
        del data["since"]
    return data if data.get("attempt", attempt) == attempt else None


def read_lost(run_dir: Path, attempt: int) -> dict[str, Any] | None:
    data = jobfiles.json_object(Path(run_dir) / LOST, 1 << 20)
    if data is None:
        return None
    data = jobfiles.well_typed(data, LOST_FIELDS)
    return data if data.get("attempt", attempt) == attempt and data.get("node") else None


def seen_step(run_dir: Path) -> int | None:
    """The newest step any rank's heartbeat reported (contract 1), else the newest metrics.jsonl step."""
    steps = []
    for p in jobfiles.folder(Path(run_dir) / HEARTBEAT, "rank-*.json"):
        step = (jobfiles.json_object(p, 1 << 20) or {}).get("step")
        steps.append(step if jobfiles.is_a(step, int) else 0)
    if not steps:
        for row in jobfiles.json_lines("\n".join(_read(Path(run_dir) / METRICS, 8192).splitlines()[-3:])):
            if jobfiles.is_a(row.get("step"), int):
                steps.append(row["step"])
    return max(steps) if steps else None


def checkpoint_in(run_dir: Path) -> int | None:
    """The step of the checkpoint a retry will resume from: the newest that verifies, as the trainer chooses
    (a newer damaged one it will set aside is passed over here too)."""
    try:
        found = checkpoints.newest(Path(run_dir) / CHECKPOINTS)
    except OSError:
        return None
    return int(checkpoints.NAME.fullmatch(found.name).group(1)) if found is not None else None


def node_states(partition: str | None, runner: Runner = _run) -> dict[str, str]:
    argv = ["sinfo", "-h", "-N", "-o", "%N|%T"] + (["-p", partition] if partition else [])
    proc = runner(argv)
    return parse_sinfo_nodes(proc.stdout) if proc.returncode == 0 else {}


def slurm_seconds(text: str) -> int | None:
    """Slurm's ``[D-][HH:]MM:SS`` (TimeLimit, RunTime) in seconds; None for UNLIMITED and the like."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def gather(job_dir: Path, job_id: str, attempt: int, step_status: int | None, ranks_per_task: int,
           ntasks: int, runner: Runner = _run, warning_s: int = 0,
           launcher: str = "srun") -> tuple[Evidence, dict[str, str]]:
    """The evidence for the attempt that just ended, read inside the job (the batch shell, after the step),
    and scontrol's view of the job (StartTime, Partition, JobState)."""
    job_dir = Path(job_dir)
    run_dir = job_dir / RUN_DIR
    shown = runner(["scontrol", "show", "job", "-o", job_id])
    job = parse_keyvalues(shown.stdout) if shown.returncode == 0 else {}
    states = node_states(job.get("Partition"), runner)
    base_id = job_id.split("_")[0]
    batch = ""
    # An array task logs to batch-ARRAYID_TASKID.out; a plain job to batch-JOBID.out.
    for candidate in (job_dir / batch_log(job_id), job_dir / batch_log(job.get("JobId", base_id))):
        batch = _read(candidate)
        if batch:
            break
    ev = Evidence(
        attempt=attempt, step_status=step_status, batch_log=attempt_segment(batch, attempt),
        task_logs={t: _read(job_dir / task_log(t), 65536) for t in _logged_tasks(job_dir, ntasks)},
        errors=tuple(e for e in read_errors(run_dir) if e.attempt == attempt),
        preempted=(run_dir / MARKER).exists(), hang=read_hang(run_dir, attempt), lost=read_lost(run_dir, attempt),
        job_state=job.get("JobState", ""), job_reason=job.get("Reason", ""),
        down_nodes=frozenset(n for n, s in states.items() if s.split("+")[0] in UNUSABLE),
        ranks_per_task=ranks_per_task, checkpoint_step=checkpoint_in(run_dir), seen_step=seen_step(run_dir),
        warning_s=warning_s, launcher=launcher)
    limit, ran = slurm_seconds(job.get("TimeLimit", "")), slurm_seconds(job.get("RunTime", ""))
    if limit is not None and ran is not None:
        ev = replace(ev, time_left_s=limit - ran)
    return ev, {**job, "_states": json.dumps(states)}


def _logged_tasks(job_dir: Path, ntasks: int) -> list[int]:
    """The tasks below ``ntasks`` that left a log: a job of a million tasks has no million files to open."""
    try:
        names = os.listdir(job_dir / LOGS_DIR)
    except OSError:
        return []
    tasks = {int(m.group(1)) for n in names if (m := _TASK_LOG.fullmatch(n))}
    return sorted(t for t in tasks if t < ntasks)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())


def end_attempt(job_dir: Path, job_id: str, attempt: int, step_status: int | None, policy: Policy,
                ranks_per_task: int, ntasks: int, runner: Runner = _run,
                warning_s: int = 0, launcher: str = "srun",
                allocation: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Classify the attempt that just ended, decide, record its line; returns (line, scontrol's job fields).
    ``allocation``: the nodes the job's allocation holds (a relaunch may use those Slurm still calls usable)."""
    ev, job = gather(job_dir, job_id, attempt, step_status, ranks_per_task, ntasks, runner, warning_s, launcher)
    states = json.loads(job.pop("_states"))
    ending = classify(ev)
    history = [a for a in load(job_dir) if a["attempt"] < attempt]
    usable = [n for n in allocation if states.get(n, "idle").split("+")[0].rstrip("*~#!%$@^-") not in UNUSABLE]
    # A job Slurm itself requeued or ended has no allocation left to relaunch in.
    alive = job.get("JobState", "RUNNING") in ("RUNNING", "COMPLETING", "")
    decision = decide(ending, history, policy, states, usable if alive else ())
    line = record(ending, decision, attempt=attempt, job_id=job_id, started=job.get("StartTime", ""),
                  ended=_now(), source="batch", seen_step=ev.seen_step)
    if not append(job_dir, line):
        line = next(a for a in load(job_dir) if a["attempt"] == attempt)
    return line, job


def shell_assignments(line: Mapping[str, Any], job: Mapping[str, str], step_status: int,
                      history: Sequence[Mapping[str, Any]] = ()) -> str:
    """What requeue.sh evals: the action, the nodes to exclude, whether Slurm already requeued the job, and
    the status the batch shell should end with; ``uses`` counts this requeue or retry among the job's."""
    import shlex

    state = job.get("JobState", "")
    # Slurm requeues a job on its own after a node failure (NODE_FAIL with --requeue): the job is then pending.
    already = state in ("PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD")
    status = step_status
    if line["ending"] in REQUEUED and line["action"] == "none":
        status = EXIT_PREEMPTED
    uses = {"requeue": ("requeue",), "retry": ("retry", "relaunch"), "relaunch": ("retry", "relaunch")}.get(
        line["action"], ())
    count = sum(1 for a in history if a.get("action") in uses) + 1 if uses else 0
    values = {"action": line["action"], "exclude": ",".join(line.get("excluded") or ()), "uses": str(count),
              "already_requeued": "1" if already else "0", "end_status": str(status),
              "next_attempt": str(int(line.get("attempt") or 0) + 1)}
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


# ---- afterwards: endings the batch shell never saw -----------------------------------------------

SACCT_RUN_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "NodeList")
_SACCT_ENDINGS = {"NODE_FAIL": "node_failure", "CANCELLED": "cancelled", "TIMEOUT": "time_limit",
                  "OUT_OF_MEMORY": "rank_crashed", "PREEMPTED": "preempted", "COMPLETED": "completed",
                  "DEADLINE": "time_limit", "BOOT_FAIL": "node_failure"}
_LIVE = ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "REQUEUE_HOLD",
         "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD")


def parse_runs(text: str, job_id: str) -> list[dict[str, str]]:
    """``sacct -D -X -n -P -o JobID,State,ExitCode,Start,End,NodeList``: every run of the job, oldest first."""
    runs = []
    for line in text.splitlines():
        cols = line.split("|")
        if len(cols) >= len(SACCT_RUN_FIELDS) and cols[0] == job_id:
            runs.append(dict(zip(SACCT_RUN_FIELDS, cols)))
    return runs


def from_sacct(runs: Sequence[Mapping[str, str]], recorded: Sequence[Mapping[str, Any]], job_id: str,
               job_dir: Path | None = None, batch_text: str = "") -> list[dict[str, Any]]:
    """Lines for the runs that ended without their batch shell recording them (a node failure or a
    cancellation killed it); classified from accounting, and from the batch log where it says more (which
    node failed)."""
    have = {a["attempt"] for a in recorded}
    previous = list(recorded)
    out = []
    for index, run in enumerate(runs):
        state = run["State"].split()[0] if run["State"] else ""
        later = index < len(runs) - 1
        if index in have or state in ("PENDING", "RUNNING", "COMPLETING") or (state in _LIVE and not later):
            continue
        segment = attempt_segment(batch_text, index) if batch_text else ""
        ending = _SACCT_ENDINGS.get(state)
        if state == "REQUEUED":
            ending = "preempted"
        code = re.fullmatch(r"(\d+):(\d+)", run.get("ExitCode", ""))
        exit_code, sig = (int(code.group(1)), int(code.group(2))) if code else (None, None)
        if ending is None:
            ending = "unknown"
        lost = failed_nodes(segment) if ending == "node_failure" else []
        node = lost[0] if lost else None
        run_dir = Path(job_dir) / RUN_DIR if job_dir else None
        step = checkpoint_in(run_dir) if run_dir else None
        detail = {"node_failure": f"node {node} failed" if node else
                  f"Slurm reported a node failure on {run.get('NodeList', '?')}",
                  "cancelled": "the job was cancelled (scancel)",
                  "time_limit": "the time limit struck",
                  "rank_crashed": "a rank ran out of memory (the OOM killer)",
                  "preempted": "Slurm requeued the job",
                  "completed": ""}.get(ending, f"Slurm recorded {state} (exit {run.get('ExitCode', '?')})")
        ended = Ending(ending, detail, node=node, exit_code=exit_code, signal=sig or None, step=step)
        action = ("retry" if ending in RETRIED else "requeue") if later else "none"
        reason = "Slurm requeued it" if later else ""
        excluded = excluded_so_far(previous)
        if action == "retry" and node:
            excluded.add(node)
            reason += f" (hpcdist keeps it off {', '.join(sorted(excluded))})"
        out.append(record(ended, Decision(action, tuple(sorted(excluded)), reason), attempt=index, job_id=job_id,
                          started=run.get("Start", ""), ended=run.get("End", ""), source="sacct"))
        previous.append(out[-1])
    return out


def reconcile(job_dir: Path, job_id: str, runner: Runner = _run) -> list[dict[str, Any]]:
    """Append lines for runs of the job that ended unrecorded; return every attempt line, oldest first."""
    proc = runner(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", ",".join(SACCT_RUN_FIELDS)])
    if proc.returncode == 0:
        batch_text = _read(Path(job_dir) / batch_log(job_id))
        for line in from_sacct(parse_runs(proc.stdout, job_id), load(job_dir), job_id, job_dir, batch_text):
            try:
                append(job_dir, line)
            except OSError:
                break  # a full disk, a read-only job directory: shown now, recorded by a later reader
    return sorted(load(job_dir), key=lambda a: a["attempt"])


def _clock(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def should_nudge(job: Mapping[str, str], now: float, settle_s: float = 2.0) -> bool:
    """Whether a pending requeued job (``scontrol show job -o`` fields) is waiting for no good reason.

    Two waits are needless: Slurm's ~120 s requeue delay, and an eligible job waiting for the next scheduling
    pass. One is needed: the nodes revoke the old run's credential when it is requeued, and a run launched
    within the same second is refused ("Job credential revoked"); so nothing is nudged until ``settle_s``
    after the requeue finished (Slurm resets SubmitTime then).
    """
    if job.get("JobState") != "PENDING" or job.get("Reason") not in ("BeginTime", "None", "Priority"):
        return False
    submitted, eligible = _clock(job.get("SubmitTime", "")), _clock(job.get("EligibleTime", ""))
    if submitted is None or now < submitted + settle_s:
        return False
    return eligible is not None and (eligible > now + 3 or eligible <= now - 1)


def nudge(job_id: str, attempts: Sequence[Mapping[str, Any]], runner: Runner = _run,
          clock: Callable[[], float] = time.time) -> bool:
    """Start a job hpcdist requeued as soon as its nodes are ready, not after Slurm's requeue delay or the next
    scheduling pass; whoever waits on the job calls this at each poll. True if it did."""
    if not attempts or attempts[-1].get("action") not in ("requeue", "retry"):
        return False
    shown = runner(["scontrol", "show", "job", "-o", job_id])
    job = parse_keyvalues(shown.stdout) if shown.returncode == 0 else {}
    if not should_nudge(job, clock()):
        return False
    excluded = ",".join(attempts[-1].get("excluded") or ())
    # A job Slurm requeued itself (a node failure) gets its excluded nodes here; for the others it repeats
    # what requeue.sh set.
    extra = [f"ExcNodeList={excluded}"] if excluded and job.get("ExcNodeList") != excluded else []
    return runner(["scontrol", "update", f"JobId={job_id}", "StartTime=now", *extra]).returncode == 0


# ---- the trainer's side --------------------------------------------------------------------------

def record_rank_error(run_dir: str | os.PathLike, environ: Mapping[str, str], error: str, kind: str,
                      exit_code: int | None = None) -> None:
    """Leave this rank's fatal error in RUN_DIR/errors/rank-R.json, so the job's report can lead with it.

    Called from the trainer's top-level except; must never raise itself.
    """
    try:
        rank = int(environ.get("RANK") or environ.get("SLURM_PROCID") or 0)
        folder = Path(run_dir) / ERRORS
        folder.mkdir(parents=True, exist_ok=True)
        data = {"rank": rank, "node": environ.get("SLURMD_NODENAME") or socket.gethostname(),
                "attempt": ranks.attempt_of(environ),
                "time": time.time(), "kind": kind, "error": " ".join(str(error).split())[:2000],
                "exit_code": exit_code, "pid": os.getpid()}
        fileio.atomic_write(folder / f"rank-{rank}.json", json.dumps(data) + "\n")
    except Exception:  # noqa: BLE001 - reporting must not mask the error being reported
        pass

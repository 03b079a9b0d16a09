"""Classify how an attempt ended: an ordered table of small rules, the first that recognises the evidence wins.

    classify(Evidence(attempt=0, step_status=137, batch_log="srun: error: n2: task 1: Killed\n"))
    -> Ending("rank_crashed", "rank 1 on n2: killed by SIGKILL", rank=1, node="n2", signal=9)

Order matters: what Slurm did to the whole job (cancel, node failure, time limit) outranks what the ranks
saw, a hang outranks the peers that timed out waiting for the hung rank, and a rank's own error outranks
the peers that reported it as a broken connection. Each rule is pinned by real failures captured on the
cluster (tests/data/failures/).
"""

from __future__ import annotations

import signal as signals
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

from hpc import jobfiles
from hpc.failures.evidence import (
    Evidence,
    TaskEnd,
    failed_nodes,
    is_symptom,
    last_error_line,
    launcher_child,
    stepd_reasons,
    stopped_by,
    task_ends,
)
from hpc.runfiles import RankError
from hpc.slurm import states
from hpc.vocab import EXIT_BAD_INPUT, EXIT_HUNG, EXIT_INTERRUPTED, EXIT_STORAGE, SETUP_PHASES

ENDINGS = ("completed", "preempted", "time_limit", "node_failure", "rank_crashed", "hung", "bad_input",
           "storage", "code_error", "cancelled", "unknown")


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
    errno: int | None = None       # a storage ending's, as the first failing rank reported it


class Facts:
    """What several rules read from the evidence, worked out once."""

    def __init__(self, ev: Evidence) -> None:
        self.ev = ev
        self.ends: list[TaskEnd] = task_ends(ev.batch_log)
        self.first_end = self.ends[0] if self.ends else None
        self.reasons = stepd_reasons(ev.batch_log)
        self.state = states.base(ev.job_state) if ev.job_state else ""
        self.step = ev.checkpoint_step
        self.per = max(ev.ranks_per_task, 1)
        self.errors = [e for e in ev.errors if e.attempt == ev.attempt]

    @cached_property
    def slurm_nodes(self) -> list[str]:
        ev, ends = self.ev, self.ends
        nodes = failed_nodes(ev.batch_log)
        if not nodes and (self.state == "NODE_FAIL" or "NODE FAILURE" in self.reasons or ev.job_reason == "NodeDown"):
            nodes = [e.node for e in ends if e.node in ev.down_nodes] or sorted(ev.down_nodes)
        if not nodes and ends and ends[0].node in ev.down_nodes:
            nodes = [ends[0].node]
        return nodes

    @cached_property
    def timed_out(self) -> bool:
        # Slurm's --signal warning (USR1@120) is sent because the time limit is near: a stop within that lead
        # time (plus Slurm's ~30 s check period) is the time limit, not a preemption.
        ev = self.ev
        near_limit = ev.time_left_s is not None and ev.time_left_s <= ev.warning_s + 30
        return self.state == "TIMEOUT" or ev.job_reason == "TimeLimit" or "TIME LIMIT" in self.reasons or near_limit

    def ranks_of(self, task: int) -> tuple[int, str]:
        first, last = task * self.per, (task + 1) * self.per - 1
        return first, (f"rank {first}" if first == last else f"ranks {first}-{last}")

    def task_line(self, task: int) -> str | None:
        return last_error_line(self.ev.task_logs.get(task, ""))


Rule = Callable[[Facts], "Ending | None"]


def _signal_name(sig: int | None) -> str:
    try:
        return signals.Signals(sig).name if sig else ""
    except ValueError:
        return f"signal {sig}"


def _who(rank: int | None, node: str | None, label: str | None = None) -> str:
    who = label or (f"rank {rank}" if rank is not None else "a rank")
    return f"{who} on {node}" if node else who


def _first_error(errors: Sequence[RankError]) -> RankError | None:
    """The rank that failed on its own first: its own bug before the peers that only noticed it."""
    own = [e for e in errors if not is_symptom(e)]
    return min(own or errors, key=lambda e: (e.time, e.rank), default=None)


def _rank_said(f: Facts, ending: str, errors: Sequence[RankError], end: TaskEnd | None, exit_code: int,
               fallback: str) -> Ending:
    """``ending`` led by the first rank's own error file, else by its task's last error line."""
    first = _first_error(errors)
    if first:
        return Ending(ending, f"{_who(first.rank, first.node)}: {first.error}", rank=first.rank, node=first.node,
                      exit_code=exit_code, step=f.step, errno=first.errno)
    task = end.task if end else min(f.ev.task_logs, default=0)
    rank, label = f.ranks_of(task)
    node = end.node if end else None
    return Ending(ending, f"{_who(rank, node, label)}: {f.task_line(task) or fallback}", rank=rank, node=node,
                  exit_code=exit_code, step=f.step)


# ---- the rules, in the order they are tried --------------------------------------------------------

def cancelled(f: Facts) -> Ending | None:
    # slurmstepd's plain "CANCELLED AT" (no "DUE TO ...") is a user's or admin's scancel: it wins even when
    # the ranks checkpointed on the SIGTERM that came with it.
    if f.state == "CANCELLED" or "CANCELLED" in f.reasons:
        return Ending("cancelled", "the job was cancelled (scancel)", step=f.step)
    return None


def node_failed(f: Facts) -> Ending | None:
    """A node Slurm itself says failed, with the ranks that ran there."""
    if not f.slurm_nodes:
        return None
    node = f.slurm_nodes[0]
    lost = [e for e in f.ends if e.node == node]
    rank, label = f.ranks_of(lost[0].task) if lost else (None, None)
    return Ending("node_failure", f"node {node} failed" + (f" ({label} ran there)" if label else ""),
                  rank=rank, node=node, signal=lost[0].signal if lost else None, step=f.step)


def node_lost(f: Facts) -> Ending | None:
    # The ranks saw every rank of a node vanish and its slurmd stop answering (train/watchdog.py): Slurm has
    # not noticed yet (SlurmdTimeout), and the batch shell ended the step rather than wait for it to.
    lost = f.ev.lost
    if not lost or not lost.get("node"):
        return None
    node, gone = lost["node"], lost.get("ranks") or []
    ranks = (f"rank(s) {', '.join(str(r) for r in gone[:8])}{' ...' if len(gone) > 8 else ''}" if gone
             else "its ranks")
    return Ending("node_failure", f"node {node} lost: {ranks} vanished and its slurmd does not answer",
                  rank=gone[0] if gone and jobfiles.is_a(gone[0], int) else None, node=node, step=f.step)


def node_fail_unnamed(f: Facts) -> Ending | None:
    return Ending("node_failure", "node ? failed", step=f.step) if f.state == "NODE_FAIL" else None


def requeued_by_slurm(f: Facts) -> Ending | None:
    # Slurm requeued the job itself (scontrol requeue, or preemption with PreemptMode=REQUEUE and no grace)
    # before the ranks could checkpoint: resumed from the newest checkpoint; the ranks it killed on the way
    # out are not a crash to retry on other nodes.
    requeued = next((r for r in f.reasons if r in ("JOB REQUEUE", "PREEMPTION")), None)
    if not requeued or f.ev.preempted:
        return None
    since = f"the checkpoint at step {f.step}" if f.step is not None else "the start (no checkpoint)"
    return Ending("preempted", f"Slurm requeued the job ({requeued}) before the ranks could checkpoint; "
                               f"it resumes from {since}", step=f.step)


def checkpointed_stop(f: Facts) -> Ending | None:
    """Every rank checkpointed after a signal: a preemption, or the time limit when it was near."""
    if not f.ev.preempted:
        return None
    stops = [stop for text in f.ev.task_logs.values() if (stop := stopped_by(text))]
    sig, at = stops[-1] if stops else (None, f.step)
    what = "the time limit" if f.timed_out else "a preemption signal"
    return Ending("time_limit" if f.timed_out else "preempted",
                  f"every rank checkpointed at step {at} after {sig or what}",
                  signal=int(getattr(signals, sig)) if sig and hasattr(signals, sig) else None, step=at)


def hung(f: Facts) -> Ending | None:
    ev = f.ev
    if not (ev.hang or ev.step_status == EXIT_HUNG or any(e.exit_code == EXIT_HUNG for e in f.ends)):
        return None
    hang = ev.hang or {}
    rank, node, since, seen = hang.get("rank"), hang.get("node"), hang.get("since"), hang.get("step")
    if hang.get("phase") in SETUP_PHASES:
        detail = f"{_who(rank, node)} froze during set-up ({hang['phase']}), before its first step"
    elif seen is not None:
        detail = f"{_who(rank, node)} made no progress after step {seen}"
    else:
        detail = f"{_who(rank, node)} stopped making progress"
    if since:
        detail += f" (since {time.strftime('%H:%M:%S', time.gmtime(float(since)))} UTC)"
    return Ending("hung", detail, rank=rank, node=node, exit_code=EXIT_HUNG, step=f.step)


def bad_input(f: Facts) -> Ending | None:
    bad = [e for e in f.errors if e.kind == "bad_input"]
    if not (bad or f.ev.step_status == EXIT_BAD_INPUT or (f.first_end and f.first_end.exit_code == EXIT_BAD_INPUT)):
        return None
    return _rank_said(f, "bad_input", bad, f.first_end, EXIT_BAD_INPUT, "bad input (exit status 2)")


def storage(f: Facts) -> Ending | None:
    # A checkpoint the disk could not take (full, over quota, read-only): the rank's line names the path and
    # the free and needed bytes; retrying would only fill the same disk again.
    errors = [e for e in f.errors if e.kind == "storage"]
    stored = next((e for e in f.ends if e.exit_code == EXIT_STORAGE), None)
    if not (errors or f.ev.step_status == EXIT_STORAGE or stored):
        return None
    return _rank_said(f, "storage", errors, stored, EXIT_STORAGE, "a checkpoint could not be written (exit status 74)")


def own_error(f: Facts) -> Ending | None:
    """A rank's own exception (not a peer's broken connection), first in time."""
    own = [e for e in f.errors if not is_symptom(e)]
    if not own:
        return None
    first = _first_error(own)
    same = len({e.error for e in own}) == 1 and len(own) > 1
    detail = f"{_who(first.rank, first.node)}: {first.error}" + (f" (the same on {len(own)} ranks)" if same else "")
    return Ending("code_error", detail, rank=first.rank, node=first.node, exit_code=first.exit_code or 1,
                  step=f.step)


def interrupted(f: Facts) -> Ending | None:
    """Ranks a person interrupted (Ctrl-C, scancel --signal=INT): the trainer exits 130 for it, or SIGINT killed the
    rank outright. Nothing else sends SIGINT, and a relaunch would undo the stop that was asked for."""
    end = f.first_end
    if not (end.signal == signals.SIGINT if end else f.ev.step_status == EXIT_INTERRUPTED):
        return None
    rank, label = f.ranks_of(end.task) if end else (None, None)
    node = end.node if end else None
    return Ending("cancelled", f"{_who(rank, node, label)}: interrupted (SIGINT), a stop asked for", rank=rank,
                  node=node, signal=int(signals.SIGINT), step=f.step)


def killed_rank(f: Facts) -> Ending | None:
    """A rank killed by a signal (srun names it, or the node's launcher reports its child's death), or a task
    that exited with its own error line."""
    ev = f.ev
    for end in f.ends:
        rank, label = f.ranks_of(end.task)
        child_rank, child_code = launcher_child(ev.task_logs.get(end.task, ""), end.task, f.per, ev.launcher,
                                                end.exit_code)
        sig = -child_code if child_code is not None and child_code < 0 else end.signal
        if child_rank is not None:
            rank, label = child_rank, None
        if sig and sig != signals.SIGTERM:
            return Ending("rank_crashed", f"{_who(rank, end.node, label)}: killed by {_signal_name(sig)}",
                          rank=rank, node=end.node, signal=sig, step=f.step)
        if sig == signals.SIGTERM and end is f.ends[-1]:
            return None
        line = f.task_line(end.task) if end.exit_code not in (None, 0) and not sig else None
        if line and not is_symptom(line):
            return Ending("code_error", f"{_who(rank, end.node, label)}: {line}", rank=rank, node=end.node,
                          exit_code=end.exit_code, step=f.step)
    return None


def time_limit(f: Facts) -> Ending | None:
    struck = "the time limit struck before every rank could checkpoint"
    return Ending("time_limit", struck, step=f.step) if f.timed_out else None


def out_of_memory(f: Facts) -> Ending | None:
    if f.state != "OUT_OF_MEMORY":
        return None
    return Ending("rank_crashed", "a rank ran out of memory (the OOM killer)", signal=int(signals.SIGKILL), step=f.step)


def completed(f: Facts) -> Ending | None:
    if f.ev.step_status != 0 or f.ends or not (f.state in ("", "COMPLETED") or f.state in states.ON_NODES):
        return None
    return Ending("completed", "", exit_code=0, step=f.ev.seen_step or f.step)


def unknown(f: Facts) -> Ending:
    """Nothing recognised it: say the most telling thing there is (a rank's error, srun's line, the status)."""
    first = _first_error(f.errors)
    if first:
        return Ending("unknown", f"{_who(first.rank, first.node)}: {first.error}", rank=first.rank, node=first.node,
                      exit_code=first.exit_code, step=f.step)
    end = f.first_end
    if end is not None:
        rank, label = f.ranks_of(end.task)
        return Ending("unknown", f"{_who(rank, end.node, label)}: {f.task_line(end.task) or end.how}", rank=rank,
                      node=end.node, exit_code=end.exit_code, signal=end.signal, step=f.step)
    code = f.ev.step_status
    return Ending("unknown", f"the step ended with status {code}" if code is not None else "no record of how it ended",
                  exit_code=code, step=f.step)


RULES: tuple[Rule, ...] = (cancelled, node_failed, node_lost, node_fail_unnamed, requeued_by_slurm,
                           checkpointed_stop, hung, bad_input, storage, own_error, interrupted, killed_rank, time_limit,
                           out_of_memory, completed, unknown)


def explain(ev: Evidence) -> tuple[str, Ending]:
    """(the name of the rule that recognised the evidence, the ending it gave)."""
    facts = Facts(ev)
    for rule in RULES:
        ending = rule(facts)
        if ending is not None:
            return rule.__name__, ending
    raise AssertionError("the last rule recognises everything")


def classify(ev: Evidence) -> Ending:
    """The attempt's ending (one of ENDINGS) with its rank, node, exit status or signal, and detail."""
    return explain(ev)[1]


"""What to do after an attempt ended: requeue a checkpointed stop, relaunch or retry a lost node, a killed rank
or a hang, and never retry bad input or a bug (pure).

    decide(ending, history, Policy(max_retries=2, nodes=2), node_states, allocation=["n1", "n2", "n3"])
    -> Decision("relaunch", ("n2",), "retry 1 of 2: relaunched in the allocation on n1, n3 from ...")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from hpc.failures.rules import Ending
from hpc.runfiles import STORAGE_ADVICE
from hpc.slurm.parse import node_state

# Endings worth another attempt on other nodes (from the newest checkpoint), and those that resume where
# every rank checkpointed together.
RETRIED = ("node_failure", "rank_crashed", "hung")
REQUEUED = ("preempted", "time_limit")
RETRY_ACTIONS = ("retry", "relaunch", "resubmit")  # each counts against --max-retries
# Node states in which Slurm would not start the job there.
UNUSABLE = ("down", "drain", "drng", "drained", "draining", "fail", "failing", "maint", "no_respond",
            "not_responding", "future", "unknown", "inval", "reboot", "power_down", "powered_down", "powering_down")
# What clears a storage failure whose errno the trainer did not report (a job directory a node cannot see).
GENERIC_ADVICE = "free space (or fix the path)"


def usable(state: str) -> bool:
    """Whether Slurm would start a job on a node in this state (sinfo's or scontrol's spelling)."""
    return node_state(state) not in UNUSABLE


@dataclass(frozen=True)
class Decision:
    """What to do next: requeue (resume after a checkpointed stop), relaunch (the step, at once, on the nodes
    left in this allocation), retry (through the queue, on other nodes), resubmit (through the queue as a new
    job, when a requeued one would wait for Slurm to notice a dead node), or none; with the nodes to keep the
    job off, and why. Each but none resumes from the newest state."""

    action: str
    excluded: tuple[str, ...] = ()
    reason: str = ""
    nodes: int | None = None       # an elastic relaunch's nodes, fewer than the job's


@dataclass(frozen=True)
class Policy:
    max_requeues: int = 3
    max_retries: int = 2
    nodes: int = 1                 # nodes the job needs
    elastic: bool = False          # with fewer nodes left, relaunch on them (--elastic)


def excluded_so_far(history: Sequence[Mapping[str, Any]]) -> set[str]:
    """Every node the job's earlier attempts kept it off (exclusions accumulate)."""
    return {node for h in history for node in (h.get("excluded") or ())}


def decide(ending: Ending, history: Sequence[Mapping[str, Any]], policy: Policy,
           node_states: Mapping[str, str], allocation: Sequence[str] = (),
           held: Mapping[str, int] | None = None, unanswered: bool = False) -> Decision:
    """Requeue a checkpointed stop, relaunch or retry a lost node/rank or a hang, never retry bad input or a bug.

    ``history`` is the job's earlier attempt lines; ``node_states`` the partition's nodes (name -> Slurm state);
    ``allocation`` the nodes this allocation holds (empty: none, as after the job has ended). A lost node, a
    killed rank or a hang is relaunched inside the allocation when its nodes can still fit the step: without
    the implicated node when a spare is left (a lost node is never used again), else on the same nodes (a
    killed rank's or a hung rank's node still answers). Otherwise it is retried through the queue. Excluded
    nodes accumulate over retries; a retry that would leave fewer usable nodes than the job needs is refused,
    saying so, rather than queued forever. ``held``: node -> the newest snapshot in its memory, which a
    relaunch resumes from when one of its nodes holds one newer than the checkpoint (a retry elsewhere cannot).
    ``unanswered``: the ending's node died unseen by Slurm (its slurmd does not answer): a requeued job would
    stay COMPLETING on it until SlurmdTimeout (minutes), so the retry through the queue is a new job.
    """
    excluded = excluded_so_far(history)
    so_far = tuple(sorted(excluded))
    if ending.ending in REQUEUED:
        used = sum(1 for h in history if h.get("action") == "requeue")
        if used >= policy.max_requeues:
            return Decision("none", so_far,
                            f"the job has used its {policy.max_requeues} requeue(s); resubmit with --resume to go on")
        return Decision("requeue", so_far, f"requeue {used + 1} of {policy.max_requeues}: resume from the checkpoint")
    if ending.ending not in RETRIED:
        why = {"bad_input": "bad input is never retried: fix it and resubmit",
               "storage": f"a storage failure is not retried: {STORAGE_ADVICE.get(ending.errno, GENERIC_ADVICE)}, "
                          "then resubmit with --resume",
               "code_error": "an error in the training code is never retried: fix it and resubmit",
               "completed": "", "cancelled": "cancelled by request",
               "unknown": "an ending hpcdist cannot classify is not retried"}
        return Decision("none", so_far, why.get(ending.ending, ""))
    used = sum(1 for h in history if h.get("action") in RETRY_ACTIONS)
    if used >= policy.max_retries:
        return Decision("none", so_far, f"the job has used its {policy.max_retries} retry(ies) (--max-retries)")
    wanted = excluded | ({ending.node} if ending.node else set())
    # In place only on a node that still answers and has not failed this job before: twice is a bad node.
    in_place = ending.ending != "node_failure" and not any(h.get("node") == ending.node for h in history)
    for keep_off in (wanted, excluded) if in_place else (wanted,):
        left = [n for n in allocation if n not in keep_off]
        if allocation and len(left) >= policy.nodes:
            where = left[:policy.nodes]
            return Decision("relaunch", tuple(sorted(keep_off)),
                            f"retry {used + 1} of {policy.max_retries}: relaunched in the allocation on "
                            f"{', '.join(where)}{resumes_from(ending, held, where)}")
    left = [n for n in allocation if n not in wanted]
    if policy.elastic and left:
        return Decision("relaunch", tuple(sorted(wanted)),
                        f"retry {used + 1} of {policy.max_retries}: elastic: relaunched in the allocation on "
                        f"{', '.join(left)}, {len(left)} of the job's {policy.nodes} nodes, the global batch kept"
                        f"{resumes_from(ending, held, left)}", nodes=len(left))
    healthy = [n for n, s in node_states.items() if n not in wanted and usable(s)]
    if node_states and len(healthy) < policy.nodes:
        return Decision("none", so_far,
                        f"not retried: excluding {', '.join(sorted(wanted))} leaves {len(healthy)} usable node(s) "
                        f"({', '.join(sorted(healthy)) or 'none'}) for a job that needs {policy.nodes}")
    return _through_the_queue(ending, f"retry {used + 1} of {policy.max_retries}", tuple(sorted(wanted)), unanswered)


def _through_the_queue(ending: Ending, retry: str, wanted: tuple[str, ...], unanswered: bool) -> Decision:
    where = f" without {', '.join(wanted)}" if wanted else ""
    if unanswered and ending.node:
        return Decision("resubmit", wanted, f"{retry} through the queue as a new job{where}{resumes_from(ending)} "
                                            f"(requeued, it would wait until Slurm declares {ending.node} down)")
    return Decision("retry", wanted, f"{retry} through the queue{where}{resumes_from(ending)}")


def resumes_from(ending: Ending, held: Mapping[str, int] | None = None, nodes: Sequence[str] = ()) -> str:
    """Where the next attempt resumes: the newest snapshot in the memory of ``nodes`` (a relaunch's), when newer
    than the checkpoint; else the checkpoint."""
    in_memory = max(((held or {}).get(n, -1) for n in nodes), default=-1)
    if in_memory > (-1 if ending.step is None else ending.step):
        return f" from the snapshot at step {in_memory} in node memory"
    if ending.step is None:
        return " from the start (no checkpoint)"
    return f" from the checkpoint at step {ending.step}"


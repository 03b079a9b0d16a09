"""The drill's scenarios and what each must show: the pure check that a faulted job was classified, retried and
resumed exactly (hpc/drill_run.py runs the jobs and injects the faults).

    hpcdist drill --nodes 2 --backend ddp                          # the five basic scenarios, one after another
    hpcdist drill --nodes 2 --backend deepspeed --launcher deepspeed --scenarios rank_kill,hang --json
    hpcdist drill --nodes 2 --node-control "bash scripts/slurm-local.sh" --small-disk /tmp/slurm-local/small-disk

Each scenario submits the same small job (fp32, a loss logged every step, a checkpoint every 5 steps),
waits for step FAULT_STEP, injects its fault, waits for the job to end and checks: the first attempt's ending
class and action, the excluded node, the step the next attempt resumed from, that every logged loss equals
an uninterrupted reference run's, and the time from the fault to the next training step and back to the
fault's step. A storage fault is not recovered from (a retry would fail alike): its check is the ending that
names it, the job's losses up to it, and its checkpoints (every kept one whole, nothing half-written).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from hpc import shown
from hpc.checkpoints import SNAPSHOT_EVERY_S
from hpc.failures.policy import RETRY_ACTIONS
from hpc.slurm import grammar

SCENARIOS = ("preempt", "time_limit", "rank_kill", "node_loss", "hang", "batch_host_loss", "disk_full")
# What a scenario needs of the site beyond a Slurm partition: the drill's option that provides it.
NEEDS = {"batch_host_loss": ("--node-control", "a command that kills a node for real"),
         "disk_full": ("--small-disk", "a folder on a small file system every node sees")}
# The ones the batch shell classifies (hpc/failures); a dead batch host is named by its waiter (hpc/rescue.py).
BATCH_CLASSIFIED = tuple(s for s in SCENARIOS if s != "batch_host_loss")
# The ones that resume from the state held before the fault (a snapshot, a checkpoint), not one written at it.
FROM_HELD_STATE = ("rank_kill", "node_loss", "hang", "batch_host_loss")
FAULT_STEP = 10
CHECKPOINT_EVERY = 5
LOSS_TOLERANCE = 1e-6
# The trainer's arguments for every drill job (fp32 and one thread per rank keep the sums in one order, so
# a resumed run's losses equal the reference's exactly); --epochs is large so that --max-steps decides.
TRAIN_ARGS = ("--epochs", "1000", "--log-every", "1", "--dataset", "synthetic", "--synthetic-size", "1024",
              "--batch-size", "64", "--threads", "1", "--timeout-s", "120")
# The drill's own cadence: every fault resumes from a checkpoint at most CHECKPOINT_EVERY steps old, at FAULT_STEP.
# With --job-defaults the job's defaults decide instead (snapshots in node memory every SNAPSHOT_EVERY_S,
# checkpoints every 10 minutes) and a fault comes half an interval after a snapshot was published, the average
# moment: the time a user with default options loses. disk_full keeps the cadence: its fault is a checkpoint.
CADENCE = ("--checkpoint-every", str(CHECKPOINT_EVERY))
SNAPSHOT_PHASE_S = SNAPSHOT_EVERY_S / 2
# Seconds of training a job with the defaults needs after its start-up: the first snapshot, half an interval, and
# the recovery's steps (the time-limit job's is longer: TIME_LIMIT_REACH_S).
DEFAULTS_REACH_S = 15
# Slurm keeps a time limit in whole minutes and acts on a cut one at its next check (every ~30 s; the
# --signal warning came 3-11 s after the cut in the matrix's five cells), so the time-limit job must still be
# training this long after the fault: its steps come from the measured rate.
TIME_LIMIT_REACH_S = 35
# The reference job runs until the drill has every step it needs (then it is cancelled).
REFERENCE_STEPS_CAP = 1_000_000
POLL_S = 0.2
# Every backend x launcher the trainer runs (ddp cannot run under DeepSpeed's launcher), with the options that
# make it a drill of its own: ZeRO stages differ per launcher so that sharded optimizer state (1, 2) and
# sharded parameters (3) are each drilled once.
MATRIX = {
    "ddp/srun": ("--backend", "ddp", "--launcher", "srun"),
    "ddp/torchrun": ("--backend", "ddp", "--launcher", "torchrun"),
    "deepspeed/srun": ("--backend", "deepspeed", "--launcher", "srun", "--zero-stage", "1"),
    "deepspeed/torchrun": ("--backend", "deepspeed", "--launcher", "torchrun", "--zero-stage", "3"),
    "deepspeed/deepspeed": ("--backend", "deepspeed", "--launcher", "deepspeed", "--zero-stage", "2"),
}


# (pair, scenario) cells drilling every scenario once, in the order of SCENARIOS, and every backend x launcher pair at
# least once (CI's share of the matrix; scripts/drill-matrix.py runs them all). Each scenario sits where it costs least
# here: the time limit, which must outlast Slurm's 30 s check, under srun's quick start; the hang, at two ranks a node,
# under ddp rather than four DeepSpeed ranks (measured: 75 s against 85 s, 56 s against 70 s).
DIAGONAL = (("deepspeed/deepspeed", "preempt"), ("ddp/srun", "time_limit"), ("deepspeed/srun", "rank_kill"),
            ("deepspeed/torchrun", "node_loss"), ("ddp/torchrun", "hang"), ("deepspeed/deepspeed", "batch_host_loss"),
            ("deepspeed/torchrun", "disk_full"))


@dataclass(frozen=True)
class Expect:
    """What a scenario must end as: the first attempt's ending and action, and whether a node is excluded."""

    ending: str
    action: str
    excludes: bool
    recovers: bool = True  # False: the job must end FAILED, saying why, with nothing to resume


EXPECT = {
    "preempt": Expect("preempted", "requeue", False),
    "time_limit": Expect("time_limit", "requeue", False),
    "rank_kill": Expect("rank_crashed", "relaunch", False),
    "node_loss": Expect("node_failure", "retry", True),
    "hang": Expect("hung", "relaunch", False),
    # The allocation went with its batch host: a waiter starts the run again as a new job without it.
    "batch_host_loss": Expect("node_failure", "resubmit", True),
    "disk_full": Expect("storage", "none", False, recovers=False),
}


def choose(scenarios: str | None, given: Mapping[str, object]) -> list[str]:
    """The scenarios to drill from ``--scenarios`` (None: the basic ones, and each other whose option is
    ``given``); ValueError naming the fix for an unknown one or one whose option is missing."""
    if scenarios is None:
        return [s for s in SCENARIOS if s not in NEEDS or given.get(NEEDS[s][0])]
    chosen = [s.strip() for s in scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown or not chosen:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SCENARIOS)}")
    for s in chosen:
        if s in NEEDS and not given.get(NEEDS[s][0]):
            raise ValueError(f"{s} needs {NEEDS[s][0]}, {NEEDS[s][1]}; give it, or leave {s} out")
    return chosen


def expect(scenario: str, spare_nodes: int = 0, real_death: bool = False) -> Expect:
    """What the first attempt must end in and do. With a spare node held, every failure is relaunched inside the
    allocation on the spare, off the failed node; ``real_death``: node_loss kills the node (--node-control), which
    with no spare is left as a new job: requeued, the job would wait for Slurm to declare the node down."""
    if spare_nodes and scenario in ("rank_kill", "node_loss", "hang"):
        return Expect(EXPECT[scenario].ending, "relaunch", True)
    if scenario == "node_loss" and real_death:
        return Expect("node_failure", "resubmit", True)
    return EXPECT[scenario]


FAULTS = {
    "preempt": "SIGUSR1 to every rank (scancel --signal=USR1), as Slurm's --signal warning sends",
    "time_limit": "the job's time limit cut to the minute it is in (scontrol update TimeLimit): Slurm's "
                  "--signal warning, else SIGTERM and SIGKILL after KillWait, at its next check",
    "rank_kill": "SIGKILL to the last rank's process",
    "node_loss": "the last rank's node dies: with --node-control, its slurmd and every process on it SIGKILLed "
                 "and nobody setting it DOWN (revived afterwards); without, SIGKILL to the job's processes there "
                 "and the node set DOWN, as an admin would (resumed afterwards)",
    "hang": "SIGSTOP to the last rank's process (SIGCONT afterwards)",
    "batch_host_loss": "the batch host dies: its slurmd and every process on it SIGKILLed (--node-control), nobody "
                       "setting it DOWN; the drill waits as submit --wait does (revived afterwards)",
    "disk_full": "the job directory's file system (--small-disk) filled to half a checkpoint's size before the "
                 "next checkpoint (the filler removed afterwards)",
}


@dataclass
class Observed:
    """What the drill saw of one scenario's job."""

    scenario: str
    job_id: str = ""
    job_dir: str = ""
    victim_rank: int | None = None
    victim_node: str | None = None
    fault_at: float | None = None          # unix time the fault was injected (the time limit: when it struck)
    fault_step: int | None = None          # the newest logged step at the fault
    next_step_at: float | None = None      # unix time of the first training step after the fault's attempt
    back_at: float | None = None           # unix time a later attempt logged the fault's step again
    recorded_at: float | None = None       # when the faulted attempt's line appeared in attempts.jsonl
    restarted_at: float | None = None      # when the next attempt's batch shell started (its batch-log line)
    final_state: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    resumed_step: int | None = None
    losses: dict[int, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """One scenario's verdict, as printed and as ``--json`` writes it."""

    scenario: str
    ok: bool
    job_id: str
    ending: str | None
    expected: str
    action: str | None
    retries: int
    requeues: int
    excluded: list[str]
    victim: str | None
    resumed_step: int | None
    losses_equal: bool | None
    compared_steps: int
    max_loss_diff: float | None
    recovery_s: float | None
    lost_s: float | None                   # the time lost: fault -> a later attempt back at the fault's step
    phases: dict[str, float]               # recovery split: classified (fault -> attempt recorded),
                                           # restarted (-> next batch shell), first_step (-> next step)
    final_state: str
    detail: str
    problems: list[str]


# ---- pure parts ----------------------------------------------------------------------------------

def _records(metrics_text: str, key: str) -> list[tuple[int, float]]:
    """(step, ``key``) of each whole record of metrics.jsonl, in file order (a line being written is skipped)."""
    out = []
    for line in metrics_text.splitlines():
        try:
            data = json.loads(line)
            out.append((int(data["step"]), float(data[key])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def logged_steps(text: str) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a resumed run appends, so the last record of a step wins."""
    return dict(_records(text, "loss"))


def resumed_from(rank0_log: str) -> int | None:
    """The step the first resumed attempt (the one after the fault) started from (``resumed from DIR at step
    N``), if any did."""
    found = re.findall(r"resumed from \S+ at step (\d+)", rank0_log)
    return int(found[0]) if found else None


def compare(losses: Mapping[int, float], reference: Mapping[int, float], upto: int) -> tuple[bool, int, float | None]:
    """(equal, steps compared, largest difference) over steps 1..upto; a step missing on either side differs."""
    diffs = [abs(losses[s] - reference[s]) for s in range(1, upto + 1) if s in losses and s in reference]
    worst = max(diffs, default=None)
    return (len(diffs) == upto and worst is not None and worst <= LOSS_TOLERANCE), len(diffs), worst


def check(seen: Observed, reference: Mapping[int, float], steps: int, spare_nodes: int = 0,
          real_death: bool = False) -> Result:
    """The verdict on one scenario from what was observed and the reference run's losses."""
    expected = expect(seen.scenario, spare_nodes, real_death)
    problems = list(seen.problems)
    first = seen.attempts[0] if seen.attempts else {}
    ending, action = first.get("ending"), first.get("action")
    if not seen.attempts:
        problems.append("no attempt was recorded in attempts.jsonl")
    elif ending != expected.ending:
        problems.append(f"first attempt ended {ending}, expected {expected.ending}")
    if seen.attempts and action != expected.action:
        problems.append(f"first attempt's action was {action}, expected {expected.action}")
    excluded = list(first.get("excluded") or [])
    if expected.excludes and seen.victim_node and seen.victim_node not in excluded:
        problems.append(f"node {seen.victim_node} was not excluded (excluded: {excluded or 'none'})")
    if not expected.excludes and excluded:
        problems.append(f"{', '.join(excluded)} excluded, though the job could go on in place")
    if expected.ending == "hung" and seen.victim_rank is not None and first.get("rank") != seen.victim_rank:
        problems.append(f"the hang was blamed on rank {first.get('rank')}, not the stopped rank {seen.victim_rank}")
    upto = min(max(seen.losses, default=0), max(reference, default=0))
    equal, compared, worst = compare(seen.losses, reference, upto)
    final = "COMPLETED" if expected.recovers else "FAILED"
    if seen.final_state != final:
        problems.append(f"the job ended {seen.final_state or 'unknown'}, not {final}")
    problems += (_recovery_problems(seen, steps, upto) if expected.recovers
                 else _ending_problems(seen, first.get("detail") or ""))
    if not equal:
        problems.append(f"losses differ from the uninterrupted run (largest difference {worst}, "
                        f"{compared} of {upto} steps compared)")
    recovery = round(seen.next_step_at - seen.fault_at, 1) if seen.next_step_at and seen.fault_at else None
    marks = [("classified", seen.recorded_at), ("restarted", seen.restarted_at), ("first_step", seen.next_step_at)]
    phases, last = {}, seen.fault_at
    for name, at in marks:
        if at is not None and last is not None:
            phases[name] = round(at - last, 1)
            last = at
    if recovery is None and expected.recovers:
        problems.append("no training step was seen after the fault's attempt ended")
    return Result(
        scenario=seen.scenario, ok=not problems, job_id=seen.job_id, ending=ending, expected=expected.ending,
        action=action, retries=sum(a.get("action") in RETRY_ACTIONS for a in seen.attempts),
        requeues=sum(a.get("action") == "requeue" for a in seen.attempts), excluded=excluded,
        victim=(f"rank {seen.victim_rank} on {seen.victim_node}" if seen.victim_node else None),
        resumed_step=seen.resumed_step, losses_equal=equal, compared_steps=compared, max_loss_diff=worst,
        recovery_s=recovery, lost_s=round(seen.back_at - seen.fault_at, 1) if seen.back_at and seen.fault_at else None,
        phases=phases, final_state=seen.final_state, detail=str(first.get("detail") or ""), problems=problems)


def _recovery_problems(seen: Observed, steps: int, upto: int) -> list[str]:
    """What else is wrong with a recovery (check() wants it COMPLETED): every step logged, resumed from a
    checkpoint that the reference's steps reach past."""
    problems = []
    if seen.resumed_step is None:
        problems.append("no attempt resumed from a checkpoint")
    if seen.final_state == "COMPLETED" and max(seen.losses, default=0) < steps:
        problems.append(f"only {max(seen.losses, default=0)} of {steps} steps were logged")
    if seen.resumed_step is not None and upto <= seen.resumed_step:
        problems.append(f"the reference stops at step {upto}, before the resume at {seen.resumed_step}")
    return problems


def _ending_problems(seen: Observed, detail: str) -> list[str]:
    """What else is wrong with a fault that must end the job (check() wants it FAILED): not retried, its line
    saying how much room there was and was needed (drill_run adds what it found of the checkpoints)."""
    problems = []
    if len(seen.attempts) != 1:
        problems.append(f"{len(seen.attempts)} attempts were recorded, not the one that failed")
    if not re.search(r"bytes free, about [\d,]+ needed", detail):
        problems.append(f"the ending does not say the room there was and was needed: {detail!r}")
    return problems


def table(results: Sequence[Result]) -> str:
    """The drill's report: one row per scenario."""
    rows = [("scenario", "ok", "ending", "action", "retries", "excluded", "resumed", "losses", "recovery_s", "lost_s",
             "job")]
    for r in results:
        losses = "-" if r.losses_equal is None else (f"equal ({r.compared_steps})" if r.losses_equal else "DIFFER")
        rows.append((r.scenario, "ok" if r.ok else "FAIL", r.ending or "-", r.action or "-", str(r.retries),
                     ",".join(r.excluded) or "-", "-" if r.resumed_step is None else str(r.resumed_step), losses,
                     "-" if r.recovery_s is None else f"{r.recovery_s:.1f}",
                     "-" if r.lost_s is None else f"{r.lost_s:.1f}", r.job_id))
    lines = shown.aligned(rows)
    for r in results:
        if r.detail:
            lines.append(f"{r.scenario}: {r.detail}")
        lines += [f"{r.scenario}: FAIL: {p}" for p in r.problems]
    return "\n".join(lines)


def restart_time(batch_text: str, attempt: int) -> float | None:
    """When attempt ``attempt``'s batch shell started: its ``hpcdist: attempt N started on NODE at T`` line."""
    m = re.search(rf"^hpcdist: attempt {attempt} started on \S+ at (\S+)", batch_text, re.M)
    return grammar.timestamp(m.group(1)) if m else None


def step_rate(metrics_text: str) -> float | None:
    """Steps per second from metrics.jsonl lines (``step``, ``time_s``), past the first step's start-up."""
    rows = [r for r in _records(metrics_text, "time_s") if r[0] > 5]  # the first steps carry start-up and warm-up
    if len(rows) < 2 or rows[-1][1] <= rows[0][1]:
        return None
    return (rows[-1][0] - rows[0][0]) / (rows[-1][1] - rows[0][1])


def steps_at(rate: float, least: int, reach_s: float) -> int:
    """Steps for a job still training ``reach_s`` at this rate after FAULT_STEP, and two checkpoints' worth to resume
    into: the time-limit job's (TIME_LIMIT_REACH_S), a job's with the defaults (DEFAULTS_REACH_S)."""
    return max(least, FAULT_STEP + int(rate * reach_s) + 2 * CHECKPOINT_EVERY)


def train_args(scenario: str, job_defaults: bool) -> tuple[str, ...]:
    """The trainer's arguments for a scenario's job (or the reference's): the drill's cadence unless
    ``job_defaults``."""
    return TRAIN_ARGS + (CADENCE if scenario == "disk_full" or not job_defaults else ())


def as_json(results: Iterable[Result]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)

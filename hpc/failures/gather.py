"""End an attempt inside the job: read its evidence from the job directory and Slurm, classify it, decide, and
record its line; then tell requeue.sh what to do.

    python -m hpc attempt end --job-dir DIR --step-status 137 --max-requeues 3 --max-retries 2 --nodes 2
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpc import checkpoints, jobfiles, monitor, runfiles
from hpc.failures import record as records
from hpc.failures.evidence import Evidence, attempt_segment, context, task_ends
from hpc.failures.policy import REQUEUED, RETRY_ACTIONS, Policy, decide, usable
from hpc.failures.rules import classify
from hpc.slurm import commands, grammar, parse, states
from hpc.slurm.runner import Runner, run
from hpc.vocab import CHECKPOINTS, EXIT_PREEMPTED, LOGS_DIR, METRICS, PREEMPTED, RUN_DIR, TASK_LOG, task_log
from hpc.vocab import batch_log as batch_log_name

# logs/task-%t.log's file name, %t read back as the task's index.
_TASK_LOG = re.compile(re.escape(TASK_LOG.split("/")[-1]).replace(re.escape("%t"), r"(\d{1,7})"))


# The signals hpcdist stops a job with (--signal USR1@N, preemption's SIGUSR1/SIGUSR2), and how long the batch
# shell waits for the ranks' checkpoint when srun says a task died of one of them.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_MARKER_WAIT_S = 30.0


def seen_step(run_dir: Path, beats: Mapping[int, monitor.Heartbeat]) -> int | None:
    """The newest step any rank's heartbeat (``beats``, contract 1) reported, else the newest metrics.jsonl step."""
    steps = [b.step or 0 for b in beats.values()]
    if not steps:
        for row in jobfiles.json_lines("\n".join(jobfiles.tail_text(Path(run_dir) / METRICS, 8192).splitlines()[-3:])):
            if jobfiles.is_a(row.get("step"), int):
                steps.append(row["step"])
    return max(steps) if steps else None


def snapshots_held(beats: Mapping[int, monitor.Heartbeat]) -> dict[str, int]:
    """Node -> the newest snapshot its local rank 0 reported in memory (train/snapshot.py): where a relaunch on
    that node resumes from, if newer than the disk's checkpoint."""
    return {b.hostname: b.snapshot_step for b in beats.values() if b.snapshot_step is not None and b.hostname}


def checkpoint_in(run_dir: Path) -> int | None:
    """The step a retry through the queue resumes from on disk (hpc.checkpoints.resumable_step): a newer checkpoint
    the trainer will set aside as truncated or unlisted is passed over here too."""
    try:
        return checkpoints.resumable_step(Path(run_dir) / CHECKPOINTS)
    except OSError:
        return None


def gather(job_dir: Path, job_id: str, attempt: int, step_status: int | None, ranks_per_task: int,
           ntasks: int, runner: Runner = run, warning_s: int = 0,
           launcher: str = "srun") -> tuple[Evidence, dict[str, str], dict[str, str]]:
    """The evidence for the attempt that just ended, read inside the job (the batch shell, after the step),
    scontrol's view of the job (StartTime, Partition, JobState) and its partition's node states."""
    job_dir = Path(job_dir)
    run_dir = job_dir / RUN_DIR
    job = parse.keyvalues(commands.show("job", job_id, runner=runner))
    nodes = parse.node_states(commands.sinfo_nodes(job.get("Partition"), runner=runner))
    # An array task logs to batch-ARRAYID_TASKID.out; a plain job to batch-JOBID.out.
    names = (job_id, job.get("JobId", job_id.split("_")[0]))
    batch = next(filter(None, (jobfiles.tail_text(job_dir / batch_log_name(n), 262144) for n in names)), "")
    segment = attempt_segment(batch, attempt)
    await_stop_marker(run_dir / PREEMPTED, segment)
    beats = monitor.read_heartbeats(run_dir)
    limit, ran = grammar.duration_s(job.get("TimeLimit", "")), grammar.duration_s(job.get("RunTime", ""))
    ev = Evidence(
        attempt=attempt, step_status=step_status, batch_log=segment,
        task_logs={t: attempt_segment(jobfiles.tail_text(job_dir / task_log(t), 65536), attempt)
                   for t in _logged_tasks(job_dir, ntasks)},
        errors=tuple(e for e in runfiles.read_errors(run_dir) if e.attempt == attempt),
        preempted=(run_dir / PREEMPTED).exists(), hang=runfiles.read_hang(run_dir, attempt),
        lost=runfiles.read_lost(run_dir, attempt), job_state=job.get("JobState", ""),
        job_reason=job.get("Reason", ""), down_nodes=frozenset(n for n, s in nodes.items() if not usable(s)),
        ranks_per_task=ranks_per_task, checkpoint_step=checkpoint_in(run_dir), seen_step=seen_step(run_dir, beats),
        snapshots=snapshots_held(beats),
        warning_s=warning_s, launcher=launcher, time_left_s=None if limit is None or ran is None else limit - ran)
    return ev, job, nodes


def await_stop_marker(marker: Path, segment: str, wait_s: float = STOP_MARKER_WAIT_S,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Whether rank 0's stop marker is there, waiting up to ``wait_s`` for it when every task srun reported was
    ended by a stop signal itself: what srun saw die was then a wrapper without a handler (a container runtime's,
    a shell) while the rank it ran may still be writing its checkpoint."""
    ends = task_ends(segment)
    stopped = bool(ends) and all(e.signal in STOP_SIGNALS for e in ends)
    deadline = clock() + (wait_s if stopped else 0)
    while not marker.exists():
        if clock() >= deadline:
            return False
        sleep(0.5)
    return True


def _logged_tasks(job_dir: Path, ntasks: int) -> list[int]:
    """The tasks below ``ntasks`` that left a log: a job of a million tasks has no million files to open."""
    try:
        names = os.listdir(job_dir / LOGS_DIR)
    except OSError:
        return []
    tasks = {int(m.group(1)) for n in names if (m := _TASK_LOG.fullmatch(n))}
    return sorted(t for t in tasks if t < ntasks)


def end_attempt(job_dir: Path, job_id: str, attempt: int, step_status: int | None, policy: Policy,
                ranks_per_task: int, ntasks: int, runner: Runner = run,
                warning_s: int = 0, launcher: str = "srun", allocation: Sequence[str] = (),
                resubmit: Callable[[Sequence[str]], str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Classify the attempt that just ended, decide, record its line; returns (line, scontrol's job fields).
    ``allocation``: the nodes the job's allocation holds (a relaunch may use those Slurm still calls usable).
    ``resubmit(excluded)`` submits the job again as a new one and returns its id (hpc.rescue's), when the
    decision is to; if it raises, the job is requeued instead, saying why."""
    ev, job, nodes = gather(job_dir, job_id, attempt, step_status, ranks_per_task, ntasks, runner, warning_s,
                             launcher)
    ending = classify(ev)
    history = [a for a in records.load(job_dir) if a["attempt"] < attempt]
    healthy = [n for n in allocation if usable(nodes.get(n, "idle"))]
    # A job Slurm itself requeued or ended has no allocation left to relaunch in (nor needs a new job).
    alive = not job.get("JobState") or job["JobState"] in states.ON_NODES
    # The ranks' own verdict (lost.json) names a node whose slurmd stopped answering: Slurm has not noticed.
    unanswered = (alive and resubmit is not None and ending.ending == "node_failure" and ending.node is not None
                  and (ev.lost or {}).get("node") == ending.node)
    decision = decide(ending, history, policy, nodes, healthy if alive else (), held=ev.snapshots,
                      unanswered=unanswered)
    if decision.action == "resubmit" and resubmit is not None:
        try:
            new_id = resubmit(decision.excluded)
        except Exception as exc:  # noqa: BLE001 - any refusal leaves the requeue, which still resumes
            decision = replace(decision, action="retry", reason=f"{decision.reason}; not submitted again ({exc}): "
                                                                 "requeued instead")
        else:
            decision = replace(decision, reason=f"{decision.reason}: job {new_id}")
    line = records.record(ending, decision, attempt=attempt, job_id=job_id, started=job.get("StartTime", ""),
                          ended=time.strftime("%Y-%m-%dT%H:%M:%S"), source="batch", seen_step=ev.seen_step,
                          context=context(ev))
    if not records.append(job_dir, line):
        line = next(a for a in records.load(job_dir) if a["attempt"] == attempt)
    return line, job


def shell_assignments(line: Mapping[str, Any], job: Mapping[str, str], step_status: int,
                      history: Sequence[Mapping[str, Any]] = ()) -> str:
    """What requeue.sh evals: the action, the nodes to exclude, whether Slurm already requeued the job, and
    the status the batch shell should end with; ``uses`` counts this requeue or retry among the job's."""
    # Slurm requeues a job on its own after a node failure (NODE_FAIL with --requeue): the job is then pending.
    already = job.get("JobState", "") in states.REQUEUED
    status = EXIT_PREEMPTED if line["ending"] in REQUEUED and line["action"] == "none" else step_status
    uses = {"requeue": ("requeue",), **dict.fromkeys(RETRY_ACTIONS, RETRY_ACTIONS)}.get(line["action"], ())
    count = sum(1 for a in history if a.get("action") in uses) + 1 if uses else 0
    values = {"action": line["action"], "exclude": ",".join(line.get("excluded") or ()), "uses": str(count),
              "already_requeued": "1" if already else "0", "end_status": str(status),
              "next_attempt": str(int(line.get("attempt") or 0) + 1), "nodes": str(line.get("nodes") or "")}
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())

"""Afterwards: lines for the runs whose batch shell never recorded them (a node failure or a cancellation killed
it), read from accounting; and the nudge that starts a requeued job as soon as its nodes are ready.

    reconcile_all([(job_dir, "42")])   # each job's attempt lines, oldest first, the missing ones added from sacct
    nudge("42", attempts)          # every waiter's poll calls this (hpc/job.py)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpc import jobdir, jobfiles, nodelist
from hpc.failures import record as records
from hpc.failures.evidence import attempt_segment, failed_nodes
from hpc.failures.gather import checkpoint_in
from hpc.failures.policy import RETRIED, Decision, excluded_so_far
from hpc.failures.rules import Ending
from hpc.slurm import commands, grammar, parse, states
from hpc.slurm.runner import Runner, run
from hpc.vocab import RUN_DIR, batch_log

SACCT_RUN_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "NodeList")
_SACCT_ENDINGS = {"NODE_FAIL": "node_failure", "CANCELLED": "cancelled", "TIMEOUT": "time_limit",
                  "OUT_OF_MEMORY": "rank_crashed", "PREEMPTED": "preempted", "COMPLETED": "completed",
                  "DEADLINE": "time_limit", "BOOT_FAIL": "node_failure", "REQUEUED": "preempted"}
# The signal slurmstepd records when it could not set up the batch script's output ("IO setup failed": it could
# not open JOB_DIR/logs/batch-J.out on the batch host), so the script never ran (Slurm 22.05: FAILED, 0:53).
IO_SETUP_FAILED = 53


def from_sacct(runs: Sequence[Mapping[str, str]], recorded: Sequence[Mapping[str, Any]], job_id: str,
               job_dir: Path | None = None, batch_text: str = "") -> list[dict[str, Any]]:
    """Lines for the runs that ended without their batch shell recording them (a node failure or a
    cancellation killed it); classified from accounting, and from the batch log where it says more (which
    node failed)."""
    previous = list(recorded)
    out = []
    for index, row in enumerate(runs):
        state = states.base(row["State"]) if row["State"] else ""
        later = index < len(runs) - 1
        number = _unrecorded(index, row, previous)
        if number is None or state in states.UNFINISHED or (state in states.LIVE and not later):
            continue
        ending = _SACCT_ENDINGS.get(state, "unknown")
        exit_code, sig = grammar.exit_code(row.get("ExitCode", "")) or (None, None)
        lost = failed_nodes(attempt_segment(batch_text, number)) if ending == "node_failure" and batch_text else []
        node = lost[0] if lost else None
        step = checkpoint_in(Path(job_dir) / RUN_DIR) if job_dir else None
        unseen = unreachable(row, state, sig, job_dir, job_id, batch_text)
        if unseen:
            ending, node = "storage", unseen[0]
        detail = unseen[1] if unseen else {"node_failure": f"node {node} failed" if node else
                  f"Slurm reported a node failure on {row.get('NodeList', '?')}",
                  "cancelled": "the job was cancelled (scancel)",
                  "time_limit": "the time limit struck",
                  "rank_crashed": "a rank ran out of memory (the OOM killer)",
                  "preempted": "Slurm requeued the job",
                  "completed": ""}.get(ending, f"Slurm recorded {state} (exit {row.get('ExitCode', '?')})")
        ended = Ending(ending, detail, node=node, exit_code=exit_code, signal=sig or None, step=step)
        action = ("retry" if ending in RETRIED else "requeue") if later else "none"
        reason = "Slurm requeued it" if later else ""
        excluded = excluded_so_far(previous)
        if action == "retry" and node:
            excluded.add(node)
            reason += f" (hpcdist keeps it off {', '.join(sorted(excluded))})"
        out.append(records.record(ended, Decision(action, tuple(sorted(excluded)), reason), attempt=number,
                                  job_id=job_id, started=row.get("Start", ""), ended=row.get("End", ""),
                                  source="sacct"))
        previous.append(out[-1])
    return out


def _unrecorded(index: int, row: Mapping[str, str], lines: Sequence[Mapping[str, Any]]) -> int | None:
    """The number of the attempt that ended run ``index`` unrecorded, or None when a line records that ending.

    A run holds several attempts when the batch shell relaunched the step in its allocation: its lines carry the
    run's StartTime, and only a line whose action is no relaunch ended the run. Without such lines (older ones,
    a waiter's), the run's index is its attempt's number, as when no attempt was ever relaunched."""
    start = row.get("Start") or ""
    mine = [a for a in lines if start and a.get("started") == start]
    if mine:
        if any(a.get("action") != "relaunch" for a in mine):
            return None
    elif any(a["attempt"] == index for a in lines):
        return None
    # Past every attempt that started in this run or before it: the relaunched ones took the numbers after index.
    before = [a["attempt"] + 1 for a in lines if a.get("started") and a["started"] <= start]
    return max([index, *before])


def unreachable(row: Mapping[str, str], state: str, sig: int | None, job_dir: Path | None, job_id: str,
                batch_text: str) -> tuple[str | None, str] | None:
    """(the batch host, the storage ending's line) for a batch script that never started because its log could
    not be opened on the batch host, though the job directory is here: not mounted there (a local disk, a
    private /tmp), or not writable from there; None otherwise."""
    log = Path(job_dir) / batch_log(job_id) if job_dir is not None else None
    if state != "FAILED" or sig != IO_SETUP_FAILED or log is None or batch_text or not log.parent.is_dir():
        return None
    try:
        host: str | None = nodelist.first(row.get("NodeList") or "")
    except ValueError:
        host = None
    return host, (f"the job directory {job_dir} is not visible (or not writable) on {host or 'the batch host'}: "
                  f"Slurm could not open {log} there, so the batch script never ran; put --job-dir on a file "
                  "system every compute node mounts, then resubmit")


def reconcile_all(jobs: Sequence[tuple[Path, str]], runner: Runner = run) -> list[list[dict[str, Any]]]:
    """For each (job dir, job id), append lines for runs of the job that ended unrecorded and return every attempt
    line, oldest first; one sacct for all of them: `list` of a thousand ended jobs must not ask accounting a
    thousand times."""
    text = commands.sacct([j for _, j in jobs], SACCT_RUN_FIELDS, duplicates=True, runner=runner) if jobs else None
    runs: dict[str, list[dict[str, str]]] = {}
    for row in parse.rows(text, SACCT_RUN_FIELDS):
        runs.setdefault(row["JobID"], []).append(row)
    return [_reconciled(job_dir, job_id, None if text is None else runs.get(job_id, []))
            for job_dir, job_id in jobs]


def _reconciled(job_dir: Path, job_id: str, runs: list[dict[str, str]] | None) -> list[dict[str, Any]]:
    batch_text = jobfiles.tail_text(Path(job_dir) / batch_log(job_id), 262144) if runs else ""
    unrecorded = from_sacct(runs or [], records.load(job_dir), job_id, job_dir, batch_text)
    # Only into a job directory hpcdist made: a registry line (hand-edited, shared) may name any folder.
    for line in unrecorded if jobdir.is_job_dir(job_dir) else []:
        try:
            records.append(job_dir, line)
        except OSError:
            break  # a full disk, a read-only job directory: shown now, recorded by a later reader
    lines = records.load(job_dir)
    have = {a["attempt"] for a in lines}
    return sorted(lines + [a for a in unrecorded if a["attempt"] not in have], key=lambda a: a["attempt"])


def should_nudge(job: Mapping[str, str], now: float, settle_s: float = 2.0) -> bool:
    """Whether a pending requeued job (``scontrol show job -o`` fields) is waiting for no good reason.

    Two waits are needless: Slurm's ~120 s requeue delay, and an eligible job waiting for the next scheduling
    pass. One is needed: the nodes revoke the old run's credential when it is requeued, and a run launched
    within the same second is refused ("Job credential revoked"); so nothing is nudged until ``settle_s``
    after the requeue finished (Slurm resets SubmitTime then).
    """
    if job.get("JobState") != "PENDING" or job.get("Reason") not in ("BeginTime", "None", "Priority"):
        return False
    submitted, eligible = grammar.timestamp(job.get("SubmitTime", "")), grammar.timestamp(job.get("EligibleTime", ""))
    if submitted is None or now < submitted + settle_s:
        return False
    # requeue.sh's own begin time is at most 15 s ahead (an oci container's, hpc.container); Slurm's is ~120 s.
    return eligible is not None and (eligible > now + 30 or eligible <= now - 1)


def nudge(job_id: str, attempts: Sequence[Mapping[str, Any]], runner: Runner = run,
          clock: Callable[[], float] = time.time) -> bool:
    """Start a job hpcdist requeued as soon as its nodes are ready, not after Slurm's requeue delay or the next
    scheduling pass; whoever waits on the job calls this at each poll. True if it did."""
    if not attempts or attempts[-1].get("action") not in ("requeue", "retry"):
        return False
    job = parse.keyvalues(commands.show("job", job_id, runner=runner))
    if not should_nudge(job, clock()):
        return False
    excluded = ",".join(attempts[-1].get("excluded") or ())
    # A job Slurm requeued itself (a node failure) gets its excluded nodes here; for the others it repeats
    # what requeue.sh set.
    extra = {"ExcNodeList": excluded} if excluded and job.get("ExcNodeList") != excluded else {}
    return commands.start_now(job_id, runner, **extra)


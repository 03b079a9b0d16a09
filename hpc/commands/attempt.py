"""``hpcdist attempt end``: what requeue.sh runs after the step to classify, record and decide an attempt.

    eval "$(python -m hpc attempt end --job-dir DIR --step-status "$status" --max-requeues 3 --max-retries 2 \\
            --nodes 2 --ranks-per-task 1 --ntasks 2)"

It prints shell assignments (action, exclude, already_requeued, end_status) on stdout and one human line on
stderr (the batch log); templates/requeue.sh.j2 runs the scontrol commands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import click

from hpc import jobfiles, nodelist, shown
from hpc.spec import MAX_TASKS_PER_NODE, MAX_WORLD_SIZE
from hpc.vocab import LAUNCHERS


@click.group(hidden=True)
def attempt() -> None:
    """Attempt bookkeeping for the batch shell (templates/requeue.sh.j2)."""


@attempt.command("number")
@click.option("--job-dir", required=True, type=click.Path(file_okay=False))
def number(job_dir: str) -> None:
    """Print the number of the attempt a batch shell starts: past every recorded one and every one the batch log
    saw start (one that died with its batch shell recorded nothing), and never below Slurm's restart count (an
    allocation that relaunched steps recorded more attempts than it restarted)."""
    from hpc import ranks
    from hpc.failures import record as records
    from hpc.failures.evidence import attempts_started
    from hpc.vocab import batch_log

    recorded = [a["attempt"] for a in records.load(Path(job_dir))]
    # Only a Slurm job has a batch log; each local task runs this too, and must not count its siblings.
    started = attempts_started(jobfiles.tail_text(Path(job_dir) / batch_log(_job_id()), 262144)) if (
        os.environ.get("SLURM_JOB_ID")) else {}
    click.echo(max([ranks.attempt_of({"SLURM_RESTART_COUNT": os.environ.get("SLURM_RESTART_COUNT", "")}),
                    *(a + 1 for a in [*recorded, *started])]))


def _job_id() -> str:
    """This Slurm job's id as hpcdist names its files: an array task's JOBID_TASKID."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array else os.environ.get("SLURM_JOB_ID", "0")


@attempt.command("end")
@click.option("--job-dir", required=True, type=click.Path(file_okay=False))
@click.option("--step-status", type=int, default=0)
@click.option("--max-requeues", type=int, default=3)
@click.option("--max-retries", type=int, default=2)
@click.option("--nodes", type=int, default=1, help="Nodes the job needs (a retry must still fit).")
@click.option("--ranks-per-task", type=click.IntRange(1, MAX_TASKS_PER_NODE), default=1)
@click.option("--ntasks", type=click.IntRange(1, MAX_WORLD_SIZE), default=1)
@click.option("--signal-delay-s", type=int, default=0, help="The job's --signal lead time before its time limit.")
@click.option("--launcher", type=click.Choice(LAUNCHERS), default="srun",
              help="The job's launcher: only its own report of a dead child is read from the task logs.")
@click.option("--elastic", is_flag=True, help="With no spare left, relaunch on the nodes left.")
def end(job_dir: str, step_status: int, max_requeues: int, max_retries: int, nodes: int, ranks_per_task: int,
        ntasks: int, signal_delay_s: int, launcher: str, elastic: bool) -> None:
    """Classify the attempt that just ended, append it to attempts.jsonl, print what the batch shell does next."""
    from hpc.failures import gather, policy
    from hpc.failures import record as records

    job_id = _job_id()
    name = "HPCDIST_ATTEMPT" if os.environ.get("HPCDIST_ATTEMPT") else "SLURM_RESTART_COUNT"
    restarts = os.environ.get(name) or "0"
    attempt_no = jobfiles.count(restarts)
    if attempt_no is None:
        # requeue.sh then keeps its defaults: no action, the step's own status.
        click.echo(f"hpcdist attempt end: {name}={shown.value(restarts)} is not an attempt number; "
                   "run this from the job's batch shell", err=True)
        sys.exit(2)
    try:
        allocation = nodelist.expand(os.environ.get("SLURM_JOB_NODELIST") or "")
    except ValueError:
        allocation = []
    try:
        line, job = gather.end_attempt(Path(job_dir), job_id, attempt_no, step_status,
                                         policy.Policy(max_requeues, max_retries, nodes, elastic), ranks_per_task,
                                         ntasks, warning_s=signal_delay_s, launcher=launcher, allocation=allocation,
                                         resubmit=_submitter(Path(job_dir), job_id))
    except Exception as exc:  # noqa: BLE001 - the batch shell must still end with the step's status
        click.echo(f"hpcdist: attempt {attempt_no} ended; could not classify it: {exc}", err=True)
        click.echo(f"action=none\nexclude=''\nalready_requeued=0\nend_status={step_status}")
        sys.exit(0)
    said = records.summary_line(line).replace(f"attempt {attempt_no}:", f"attempt {attempt_no} ended:", 1)
    click.echo(f"hpcdist: {said}", err=True)
    history = [a for a in records.load(Path(job_dir)) if a["attempt"] < attempt_no]
    click.echo(gather.shell_assignments(line, job, step_status, history), nl=False)


def _submitter(job_dir: Path, job_id: str) -> Callable[[Sequence[str]], str] | None:
    """How this batch shell submits its run again as a new job (hpc.rescue.submit_again), for the job its
    directory's marker records; None for an array task or a directory without one (requeued instead)."""
    from hpc import registry, rescue

    record = registry.read_marker(job_dir)
    if record is None or record.job_id != job_id or "_" in job_id:
        return None
    return lambda excluded: rescue.submit_again(record, excluded, os.environ).job_id

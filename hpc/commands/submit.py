"""``hpcdist submit``, ``status``, ``logs``, ``cancel`` and ``list``: run rendered jobs and follow them.

    hpcdist submit --nodes 2 --backend ddp --wait -- --max-steps 30 --dataset synthetic
    hpcdist submit --via sbatch --nodes 2 --backend deepspeed --launcher deepspeed
    hpcdist status 4242 ; hpcdist logs runs/job --rank 1 --follow ; hpcdist cancel 4242 ; hpcdist list
"""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import click

from hpc import jobs, pending, registry, shown, telemetry, vocab
from hpc import logs as job_logs
from hpc.commands.options import check_container, fail, job_options, lookup, prepare, submit_or_exit
from hpc.failures import record as records
from hpc.follow import Follower, list_cells, status_lines
from hpc.job import Job, Poll, follow, histories

if TYPE_CHECKING:
    from hpc.render import Rendered

FOLLOW_POLL_S = 1.0
PENDING_POLL_S = 5.0


def _check_local(rendered: Rendered) -> None:
    from hpc import submit as submitting
    from hpc import task

    task.check_local(submitting.local_geometry(rendered.spec))
    check_container(rendered, local=True)


@click.command()
@job_options
@click.option("--via", type=click.Choice(("submitit", "sbatch")), default="submitit", show_default=True,
              help="submitit's SlurmExecutor, or `sbatch --parsable job.sbatch`.")
@click.option("--executor", type=click.Choice(("auto", "slurm", "local")), default="auto", show_default=True,
              help="local: emulate the allocation on this machine (the default where sbatch is missing).")
@click.option("--dry-run", is_flag=True, help="Render only: write the job directory, print job.sbatch.")
@click.option("--wait", "wait_", is_flag=True,
              help="Wait for the end; exit 0 if the job completed, else non-zero with the failing log's tail.")
def submit(config_file: str | None, via: str, executor: str, dry_run: bool, wait_: bool, **options: Any) -> None:
    """Render a job directory exactly as `hpcdist render` does, then submit it.

    The trainer's own arguments follow `--`.
    """
    from hpc import submit as submitting

    # Decided for a dry run too: where the job goes decides its checks and, on CPUs, its precision.
    try:
        where = submitting.choose(via, executor, jobs.slurm_available(os.environ))
    except ValueError as exc:
        fail("submit", exc)
    # The local runner emulates nodes here: the Slurm partition's limits do not bind it, its own do.
    local = where == "local"
    rendered = prepare("submit", config_file, check_partition=not local,
                       check=_check_local if local else None, here=local, **options)
    if dry_run:
        click.echo(rendered.files[vocab.JOB_SBATCH], nl=False)
        # The local runner starts each task from local-task.sh's line: no batch shell, so none of job.sbatch's.
        goes = (f"here, on the local executor, without job.sbatch, step.sh or requeue.sh: each of its "
                f"{submitting.local_geometry(rendered.spec).ntasks} task(s) runs: {rendered.local_task}") if local \
            else f"via {where}"
        click.echo(f"# job directory: {rendered.job_dir} (dry run: nothing submitted; it would run {goes})", err=True)
        return
    submitted = submit_or_exit("submit", rendered, where)
    record = submitted.record
    click.echo(f"Submitted job {record.job_id} ({where}): {record.job_dir}")
    if wait_:
        _wait(submitted)


def _wait(job: Job) -> None:
    """Follow a job to its end, as `submit --wait` and `watch` do: progress, attempts, a requeued job started
    at once, a dead batch host's run started again as a new job (hpc/rescue.py); exit non-zero unless it
    completed."""
    from hpc import rescue

    started = time.monotonic()
    shows: dict[str, Callable[[Poll], None]] = {}
    followers: list[Follower] = []

    def show(current: Job, now: Poll) -> None:
        if current.job_id not in shows:
            followers.append(Follower(current.record, click.get_text_stream("stdout")))
            shows[current.job_id] = _poller(current.record, followers[-1])
        shows[current.job_id](now)

    def rescued(old: registry.Record, new: registry.Record | None) -> None:
        history = records.load(Path(old.job_dir))
        lost = records.summary_line(history[-1]) if history else f"job {old.job_id}: its batch host was lost"
        click.echo(f"hpcdist: {lost}", err=True)

    try:
        job, final = rescue.wait(job, FOLLOW_POLL_S, on_poll=show, on_rescue=rescued)
    except KeyboardInterrupt:
        _interrupted(job)
    if followers:
        followers[-1].finish(time.monotonic() - started)
    click.echo(f"{final.line()}  waited={time.monotonic() - started:.1f}s")
    for line in _attempt_lines(job.attempts(accounted=True)):
        click.echo(line)
    if not final.ok:
        report = job_logs.failure_report(job.record)
        if report:
            click.echo(report, err=True)
        sys.exit(min(final.exit_code or 1, 255))


def _interrupted(job: Job) -> NoReturn:
    """Ctrl-C while waiting: exit 130, as an interrupted command does. A Slurm job goes on. A local job (which
    the terminal's Ctrl-C does not reach: hpc.submit._job_signals) is cancelled as `hpcdist cancel` does, and
    waited for while its ranks checkpoint; unless it ended meanwhile it reads CANCELLED, not FAILED."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stop short
    if job.handle is None:
        click.echo(f"hpcdist: interrupted: stopped waiting; job {job.job_id} goes on (`hpcdist watch {job.job_id}` "
                   f"waits again, `hpcdist cancel {job.job_id}` stops it)", err=True)
        sys.exit(130)
    from hpc import task

    jobs.cancel(job.record)
    follow(job.handle.done, bool, 0.2, task.STOP_GRACE_S + 5)
    click.echo(f"hpcdist: interrupted: job {job.job_id} cancelled, its ranks stopped", err=True)
    sys.exit(130)


def _poller(record: registry.Record, follower: Follower) -> Callable[[Poll], None]:
    """What `_wait` does at each poll of ``record``: progress, why it pends, and each attempt requeued or
    retried (hpc.job.Job.poll starts such a job at once); a local job has none (only requeue.sh records
    attempts)."""
    explain = _pending_reporter(record) if record.via != "local" else None
    announced: set[int] = set()

    def poll(now: Poll) -> None:
        follower.poll(now.state)
        if explain is not None:
            explain(now.state)
        for a in now.attempts:
            if a["attempt"] not in announced:
                announced.add(a["attempt"])
                if a.get("action") in ("requeue", "relaunch", "retry"):
                    click.echo(f"hpcdist: {records.summary_line(a)}", err=True)

    return poll


@click.command()
@click.argument("job")
def watch(job: str) -> None:
    """Wait for a job as `submit --wait` does, and start its run again as a new job if its batch host dies.

    For jobs nobody keeps a terminal open for: `nohup hpcdist watch JOB &`, or a user service."""
    record = lookup("watch", job)
    if record.via == "local":
        fail("watch", ValueError(f"job {record.job_id} runs on this machine (local executor); wait for it "
                                 "with `hpcdist status` or `logs -f`"))
    _wait(Job(record))


def _pending_reporter(record: registry.Record) -> Callable[[jobs.JobState], None]:
    """For --wait: say why the job pends (on stderr) when the reason changes, else at most once a minute;
    squeue is asked at most every PENDING_POLL_S."""
    last = {"asked": -PENDING_POLL_S, "said": -60.0, "reason": "", "sentence": ""}

    def report(current: jobs.JobState) -> None:
        now = time.monotonic()
        if current.state != "PENDING" or now - last["asked"] < PENDING_POLL_S:
            return
        last["asked"] = now
        sentence = pending.describe([record.job_id]).get(record.job_id)
        if not sentence or sentence == last["sentence"]:
            return
        reason = sentence.split(";")[0]
        if reason != last["reason"] or now - last["said"] >= 60:
            last.update(said=now, reason=reason, sentence=sentence)
            click.echo(f"hpcdist submit: job {record.job_id} {sentence}", err=True)

    return report


def _attempt_lines(history: list[dict]) -> list[str]:
    """One line per attempt, shown once a job has more than one attempt or its only one did not complete."""
    if len(history) > 1 or (history and history[-1].get("ending") != "completed"):
        return [records.summary_line(a) for a in history]
    return []


@click.command()
@click.argument("job")
def status(job: str) -> None:
    """Show a job's state (Slurm's words: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...)."""
    record = lookup("status", job)
    with ThreadPoolExecutor(1) as asking:
        # Slurm answers (squeue, sacct) while the node files are read: at 4,096 nodes both take a while.
        asked = asking.submit(lambda: (jobs.state(record), Job(record).attempts(accounted=True)))
        try:
            seen, refused = telemetry.seen_of(record), None
        except registry.JobError as exc:  # a linked run/: Slurm's word on the job is still known, and shown first
            seen, refused = None, exc
        current, history = asked.result()
    cause = records.root_cause(history[-1:]) if current.done and not current.ok else None
    if cause:
        # The root cause first: the first failing rank's own error line, not the peers that noticed it.
        click.echo(shown.line(f"{history[-1]['ending']}: {cause}", limit=2000))
    click.echo(shown.line(f"{current.line()}  via={record.via}  dir={record.job_dir}", limit=2000))
    for line in _attempt_lines(history):
        click.echo(shown.line(f"  {line}", limit=2000))

    if jobs.directory_gone(record):
        known = "Slurm's record above" if record.via != "local" else "nothing more (its task statuses were in it)"
        click.echo(f"hpcdist status: job directory {record.job_dir} no longer exists (deleted or moved): logs "
                   f"and results are gone; known is {known}", err=True)
        return
    if refused is not None:
        fail("status", refused)
    for line in status_lines(record, ended=current.done, seen=seen):
        click.echo(shown.line(line, limit=2000))
    if not current.done and record.via != "local":
        for sentence in pending.describe([record.job_id]).values():
            click.echo(sentence)


@click.command()
@click.argument("job")
@click.option("--rank", type=int, help="Only the log holding this rank (its node's, under a launcher).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the job ends.")
def logs(job: str, rank: int | None, follow: bool) -> None:
    """Print a job's per-task logs (logs/task-N.log) and its batch log."""
    record = lookup("logs", job)
    if jobs.directory_gone(record):
        fail("logs", registry.JobError(f"job directory {record.job_dir} no longer exists (deleted or moved): its "
                                       f"logs went with it; `hpcdist status {record.job_id}` shows what Slurm knows"))
    try:
        paths = job_logs.log_files(record, rank)
    except registry.JobError as exc:
        fail("logs", exc)
    if not follow:
        cause = records.root_cause(records.load(Path(record.job_dir))[-1:])
        if cause and rank is None:
            click.echo(f"hpcdist: root cause: {cause}", err=True)
        for path in paths:
            if len(paths) > 1:
                click.echo(f"==> {path} <==")
            _print_new(path, 0, prefix=False, whole=True)
        return
    offsets: dict[Path, int] = {}

    def print_new(*_: Any) -> None:
        try:  # listed again each time: logs/ may have become a link since
            shown = job_logs.log_files(record, rank)
        except registry.JobError as exc:
            fail("logs", exc)
        for path in shown:
            offsets[path] = _print_new(path, offsets.get(path, 0), prefix=len(shown) > 1)

    Job(record).wait(FOLLOW_POLL_S, on_poll=print_new)
    print_new()


def _print_new(path: Path, offset: int, prefix: bool, whole: bool = False) -> int:
    """Print the lines of a log from ``offset`` on; returns where the next call starts. Only whole lines
    unless ``whole``: a partial line is printed once its newline arrives."""
    from hpc import jobfiles

    try:
        with jobfiles.open_regular(path) as f:
            f.seek(offset)
            # In pieces, so that a log of any size is printed in bounded memory, each cut after a newline.
            while data := f.read(1 << 20):
                end = data.rfind(b"\n") + 1
                if end == 0 and (whole or len(data) == 1 << 20):
                    end = len(data)
                for line in data[:end].decode(errors="replace").splitlines():
                    click.echo(f"{path.name}: {line}" if prefix else line)
                offset += end
                if end == 0:
                    break
                f.seek(offset)
    except FileNotFoundError:
        pass
    except (OSError, jobfiles.Damaged) as exc:
        click.echo(f"hpcdist logs: {str(exc).splitlines()[0]}", err=True)
    return offset


@click.command()
@click.argument("job")
def cancel(job: str) -> None:
    """Cancel a job (scancel; a local job's tasks are stopped), or a job array given its own id."""
    try:
        # One read answers both questions: a registry rewritten between two reads could answer them apart.
        registered = registry.load(registry.registry_path(os.environ))
        tasks = registry.array_tasks(job, registered)
        # The array under its own id, which scancel takes for every one of its tasks.
        record = replace(tasks[-1], job_id=job) if tasks else registry.lookup(job, os.environ, True, registered)
    except registry.JobError as exc:
        fail("cancel", exc)
    what = f"job array {job} ({len(tasks)} tasks registered here)" if tasks else f"job {record.job_id}"
    current = jobs.states(tasks or [record])
    if all(now.done for now in current):
        click.echo(f"{what} already ended: {', '.join(sorted({now.state for now in current}))}")
        return
    try:
        stopped = jobs.cancel(record)
    except registry.JobError as exc:
        click.echo(f"hpcdist cancel: {exc}", err=True)
        sys.exit(1)
    click.echo(f"Cancelled {what}" if stopped else
               f"{what} is not running here (its controller is gone): nothing to cancel")


@click.command("list")
@click.option("--last", type=click.IntRange(min=1), default=20, show_default=True, help="How many of the newest jobs.")
def list_jobs(last: int) -> None:
    """List the jobs submitted from this machine ($HPCDIST_HOME/jobs.jsonl), newest last."""
    try:
        recent = registry.load(registry.registry_path(os.environ))[-last:]
    except registry.JobError as exc:
        fail("list", exc)
    if not recent:
        click.echo("no jobs submitted from here yet")
        return
    current = jobs.states(recent)

    rows = [("JOBID", "VIA", "STATE", "ENDING", "ATTEMPT", "STEP", "IMAGES/S", "SUBMITTED", "NAME", "BACKEND",
             "LAUNCHER", "NODES", "RANKS", "JOB_DIR")]
    # Accounting is asked only about jobs that ended: a running job's attempts are its batch shell's.
    ended = histories([Job(r) for r in recent], [now.done for now in current])
    for r, now, history in zip(recent, current, ended):
        where = f"{r.job_dir} (deleted)" if jobs.directory_gone(r) else r.job_dir
        ending = history[-1]["ending"] if history else "-"
        rows.append((r.job_id, r.via, now.state, ending, *list_cells(r), r.submitted, r.job_name,
                     r.backend, r.launcher, str(r.nodes), str(r.world_size), where))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo(shown.line("  ".join([v.ljust(w) for v, w in zip(row, widths)] + [row[-1]]), limit=1 << 20))
    # Accounting may not list a just-queued job yet (UNKNOWN): squeue says which unfinished ones pend.
    waiting = [r.job_id for r, now in zip(recent, current) if not now.done and r.via != "local"]
    for job_id, sentence in pending.describe(waiting).items():
        click.echo(f"{job_id}: {sentence}")

"""Start a run again as a new job: when its batch host died (a waiter's part), or from its batch shell.

    job, final = rescue.wait(Job(record), on_poll=show)  # every waiter's loop: a dead batch host's run goes on
    host = rescue.lost_batch_host(batch_host, lost, beats, now=time.time(), answers=slurmd_answers)
    new = rescue.resubmit(record, host, environ)      # the old job cancelled, job.sbatch submitted again
    new = rescue.submit_again(record, ["n2"], os.environ)  # the batch shell's, after n2 died unseen by Slurm

When the node running the batch shell dies, nothing of the job is left to relaunch its step, and Slurm
declares the node dead only after SlurmdTimeout (minutes), then holds the requeued job for its requeue delay.
A waiter (``submit --wait``, ``hpcdist watch``) sees it in seconds: the surviving ranks named the batch host
in run/lost.json, or every heartbeat of the attempt went silent and the batch host's slurmd does not answer.
It records the lost attempt, cancels the old job (a cancelled job is never requeued: one run of the job
directory at a time) and submits job.sbatch again without the dead node, a new job that the registry links to
the old one and that resumes from the newest checkpoint. A batch shell whose step lost a node that Slurm has
not noticed (no spare to relaunch on) does the same with submit_again rather than requeue its job, which would
stay COMPLETING on the dead node until SlurmdTimeout; every waiter then follows the new job.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hpc import beatfile, jobdir, jobfiles, monitor, registry, runfiles, telemetry, vocab, yamlfile
from hpc.failures import record as records
from hpc.failures.gather import checkpoint_in
from hpc.failures.policy import Policy, decide
from hpc.failures.rules import Ending
from hpc.follow import Pace
from hpc.job import Job, Poll
from hpc.jobs import JobState
from hpc.monitor import Heartbeat
from hpc.slurm import commands, parse
from hpc.slurm.runner import SlurmError
from hpc.spec import JobSpec

# Every heartbeat of the attempt this long silent, with the batch host's slurmd not answering, is a dead
# batch host (the ranks' own verdict, lost.json, comes sooner when a node of the job survives).
SILENT_S = 15.0


def lost_batch_host(batch_host: str, lost: Mapping | None, beats: Mapping[int, Heartbeat], *, now: float,
                    answers: Callable[[str], bool]) -> str | None:
    """The batch host's name when it is gone, else None (pure but for ``answers``, the slurmd probe)."""
    if not batch_host:
        return None
    if lost and lost.get("node") == batch_host:
        return batch_host
    current = monitor.newest_attempt(beats).values()
    if current and all((beatfile.age(now, b.time) or 0.0) > SILENT_S for b in current) and not answers(batch_host):
        return batch_host
    return None


def resubmit_options(record: registry.Record, excluded: list[str]) -> list[str]:
    """sbatch's options over job.sbatch's own for the run started again: without the dead nodes, and with its
    spares when the cluster has them (fewer, down to none, when not: the step needs only ``nodes``)."""
    options = [f"--exclude={','.join(excluded)}"]
    if record.spare_nodes:
        options.append(f"--nodes={record.nodes}-{record.nodes + record.spare_nodes}")
    return options


def resubmit(record: registry.Record, host: str, environ: Mapping[str, str],
             clock: Callable[[], float] = time.time) -> registry.Record | None:
    """Record the lost attempt, cancel the old job and, within the job's --max-retries, submit job.sbatch again
    without ``host`` (and the nodes excluded before); the new job's record, registered, or None when no retry is
    left or Slurm refused it (said in the line)."""
    job_dir = Path(record.job_dir)
    history = records.load(job_dir)
    beats = [b.attempt for b in monitor.read_heartbeats(job_dir / vocab.RUN_DIR).values()]
    number = max([*beats, *(a["attempt"] + 1 for a in history), 0])
    commands.scancel([record.job_id])
    ending = Ending("node_failure", f"the batch host {host} was lost: its ranks went silent and its "
                                    "slurmd does not answer", node=host, step=checkpoint_in(job_dir / vocab.RUN_DIR))
    decision = decide(ending, history, Policy(max_retries=max_retries(job_dir), nodes=record.nodes), {},
                      unanswered=True)

    # The ranks' verdict was acted on: the new job's batch shell must not end its own step on it. Only in a
    # directory hpcdist wrote (its marker): never a file of the same name somewhere else.
    if jobdir.is_job_dir(job_dir):
        (job_dir / vocab.RUN_DIR / vocab.LOST).unlink(missing_ok=True)
    new: registry.Record | None = None
    try:
        new = submit_again(record, decision.excluded, environ) if decision.action == "resubmit" else None
    except (SlurmError, registry.JobError) as exc:
        decision = replace(decision, action="none", reason=f"could not submit it again: {exc}")
    else:
        decision = replace(decision, reason=f"{decision.reason}: job {new.job_id}") if new else decision
    ended = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(clock()))
    records.append(job_dir, records.record(ending, decision, attempt=number, job_id=record.job_id, started="",
                                           ended=ended, source="waiter"))
    return new


def max_retries(job_dir: Path) -> int:
    """The job's --max-retries, from the spec.yaml render wrote; the default where that cannot be read."""
    try:
        spec = yamlfile.load(Path(job_dir) / vocab.SPEC_YAML, "the job's spec.yaml", follow=False)
    except yamlfile.YamlError:
        spec = None
    value = spec.get("max_retries") if isinstance(spec, dict) else None
    return value if jobfiles.is_a(value, int) and value >= 0 else JobSpec.max_retries


def submit_again(record: registry.Record, excluded: Sequence[str], environ: Mapping[str, str]) -> registry.Record:
    """Submit the job's job.sbatch again as a new job without the ``excluded`` nodes and register it, linked to
    the old one (SlurmError if Slurm refuses it, JobError, submitting nothing, if the registry could not take its
    line; one that refuses it once the job runs is said on stderr). From inside the old job too (its batch shell,
    after a node died that Slurm has not noticed): the job's own variables are not passed on to the new one."""
    registry.writable(registry.registry_path(environ))
    new_id = commands.sbatch(Path(record.job_dir) / vocab.JOB_SBATCH, options=resubmit_options(record, excluded),
                             env=commands.new_job_environ(environ))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new = replace(record, job_id=new_id, via="sbatch", submitted=now, previous=record.job_id)
    registry.write_marker(new)
    try:
        registry.append(registry.registry_path(environ), new)
    except registry.JobError as exc:
        # The job runs: raised, the caller would give the run up, or requeue the old job beside the new one.
        print(f"hpcdist: job {new_id} was submitted but is not in the job registry: {exc}", file=sys.stderr)
    return new


def successor(record: registry.Record) -> registry.Record | None:
    """The job that took over from ``record``'s when its batch shell submitted the run again (the job
    directory's marker names it, linked back), else None."""
    marker = registry.read_marker(Path(record.job_dir))
    if marker is None or marker.job_id == record.job_id or marker.previous != record.job_id:
        return None
    return marker


class Watcher:
    """A waiter's check, at each poll of a running job, for a dead batch host; cheap until something is
    silent (the controller is asked only then)."""

    def __init__(self, record: registry.Record, every_s: float = 2.0, clock: Callable[[], float] = time.time) -> None:
        self.record, self.every_s, self.clock = record, every_s, clock
        self.nudged = float("-inf")
        self.pace = Pace(every_s, clock)
        self.port: int | None = None

    def start_soon(self, state: str) -> None:
        """A job that took over from a dead one starts as soon as nodes free up: the old job releases its live
        nodes one by one, which the scheduler notices only at its next pass (~30 s) unless asked."""
        now = self.clock()
        if self.record.previous and state == "PENDING" and now - self.nudged >= self.every_s:
            self.nudged = now
            commands.start_now(self.record.job_id)

    def lost_host(self) -> str | None:
        try:
            run_dir = telemetry.run_dir(self.record)
        except registry.JobError:  # a linked run/'s silence is not this job's: no rescue on its word
            return None
        beats = self.pace.read(lambda: monitor.read_heartbeats(run_dir))
        if beats is None:
            return None
        now = self.pace.read_at
        current = monitor.newest_attempt(beats).values()
        lost = runfiles.read_lost(run_dir, max((b.attempt for b in current), default=0))
        silent = bool(current) and all((beatfile.age(now, b.time) or 0.0) > SILENT_S for b in current)
        if lost is None and not silent:
            return None
        host = parse.keyvalues(commands.show("job", self.record.job_id)).get("BatchHost", "")
        if self.port is None:
            self.port = commands.slurmd_port()
        port = self.port
        return lost_batch_host(host, lost, beats, now=now, answers=lambda node: commands.slurmd_answers(node, port))


def wait(job: Job, poll_s: float = 1.0, timeout_s: float | None = None,
         on_poll: Callable[[Job, Poll], None] = lambda job, now: None,
         on_rescue: Callable[[registry.Record, registry.Record | None], None] = lambda old, new: None,
         follow_as: Callable[[registry.Record], Job] = Job,
         environ: Mapping[str, str] = os.environ) -> tuple[Job, JobState]:
    """Follow ``job`` to its end as every waiter does (``submit --wait``, ``watch``, the drill): a requeued job
    started at once (hpc.job), and when its batch host dies its run started again as a new job (``follow_as``
    its record), followed in turn, as is one its batch shell submitted again. ``on_rescue`` hears of each (the
    new record, None if Slurm refused it).
    Returns the job followed last and its last state."""
    deadline = None if timeout_s is None else job.clock() + timeout_s
    while True:
        watcher = Watcher(job.record) if job.record.via != "local" else None
        rescued: list[registry.Record] = []

        def poll(now: Poll, job: Job = job, watcher: Watcher | None = watcher, rescued: list = rescued) -> None:
            on_poll(job, now)
            if watcher is None:
                return
            if (new := successor(job.record)) is not None:  # its batch shell submitted the run again
                on_rescue(job.record, new)
                rescued.append(new)
                return
            watcher.start_soon(now.state.state)
            if now.state.state == "RUNNING" and (host := watcher.lost_host()):
                new = resubmit(job.record, host, environ)
                on_rescue(job.record, new)
                rescued.extend([new] if new is not None else [])

        left = None if deadline is None else max(0.0, deadline - job.clock())
        final = job.wait(poll_s, left, on_poll=poll, until=lambda _, rescued=rescued: bool(rescued))
        if not rescued:
            return job, final
        job = follow_as(rescued[0])

"""Ask Slurm (or the local runner) how a submitted job stands, and cancel it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from hpc import jobfiles, nodelist, vocab
from hpc.logs import failing_task
from hpc.registry import JobError, Record
from hpc.slurm import commands, grammar, parse
from hpc.slurm.runner import Runner, SlurmError
from hpc.slurm.runner import run as slurm_run
from hpc.slurm.states import LIVE, TERMINAL
from hpc.slurm.states import base as base_state

SACCT_FIELDS = ("JobID", "State", "ExitCode", "NodeList", "Elapsed", "NNodes")
SQUEUE_FORMAT, SQUEUE_FIELDS = "%i|%T|%N|%M", ("JobID", "State", "NodeList", "Elapsed")
# Slurm's NodeList of a job that has no nodes (pending, or cancelled before it started).
NO_NODES = ("", "None assigned", "(null)")

@dataclass(frozen=True)
class JobState:
    """A job's state in Slurm's words, its exit status, and where it ran."""

    job_id: str
    state: str
    exit_code: int | None = None
    signal: int | None = None
    nodelist: str = ""
    elapsed: str = ""
    nnodes: int | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and not self.exit_code

    def line(self) -> str:
        parts = [self.job_id, self.state]
        if self.exit_code is not None:
            parts.append(f"exit={self.exit_code}" + (f" signal={self.signal}" if self.signal else ""))
        if self.nodelist not in NO_NODES:
            parts.append(f"nodes={self.nodelist}")
        if self.elapsed:
            parts.append(f"elapsed={self.elapsed}")
        return "  ".join(parts)


# ---- asking Slurm --------------------------------------------------------------------------------

def sacct_states(text: str) -> dict[str, JobState]:
    """Each job's allocation row of ``sacct -X -n -P -o JobID,State,ExitCode,NodeList,Elapsed,NNodes`` (its first),
    read in one pass: a list of many jobs is not read again for each."""
    out: dict[str, JobState] = {}
    for row in parse.rows(text, SACCT_FIELDS):
        # "CANCELLED by 0": the state is the first word.
        state = base_state(row["State"]) if row["State"] else "UNKNOWN"
        code, sig = grammar.exit_code(row["ExitCode"]) or (None, None)
        nnodes = jobfiles.count(row["NNodes"])
        out.setdefault(row["JobID"], JobState(row["JobID"], state, code, sig, row["NodeList"], row["Elapsed"], nnodes))
    return out


def parse_squeue(text: str, job_id: str) -> JobState | None:
    """A row of ``squeue -h -o %i|%T|%N|%M``."""
    for row in parse.rows(text, SQUEUE_FIELDS, job=job_id):
        return JobState(job_id, row["State"], None, None, row["NodeList"], row["Elapsed"])
    return None


def _where_it_ran(state: JobState, runner: Runner) -> JobState:
    """``state`` with the controller's NodeList (kept for MinJobAge) while accounting names fewer hosts than the
    job ran on: for a few seconds after a job ends, sacct's NodeList holds its batch host alone while NNodes is
    already right (seen on Slurm 22.05)."""
    if not state.done or not state.nnodes or state.nodelist in NO_NODES:
        return state
    try:
        if len(nodelist.expand(state.nodelist)) >= state.nnodes:
            return state
    except ValueError:
        return state
    nodes = parse.keyvalues(commands.show("job", state.job_id, runner=runner)).get("NodeList", "")
    return state if nodes in NO_NODES else replace(state, nodelist=nodes)


def current(queued: JobState | None, accounted: JobState | None) -> JobState | None:
    """A job's state from the controller's live view and accounting's record (pure).

    The controller is right about every job it still holds: accounting may keep a stale row (REQUEUED while
    the job runs again, NODE_FAIL while the controller still holds it requeued). Accounting speaks for the
    jobs the controller no longer knows, and says how they ended (exit code, where they ran).
    """
    if queued is not None and queued.state in LIVE:
        return queued
    return accounted or queued


def slurm_state(job_id: str, runner: Runner = slurm_run) -> JobState:
    return slurm_states([job_id], runner)[job_id]


def slurm_states(job_ids: Sequence[str], runner: Runner = slurm_run) -> dict[str, JobState]:
    """Each job's state: one squeue for the live ones, one sacct for the rest; LEFT_QUEUE where the
    controller no longer knows a job and accounting cannot say how it ended (down, or it has no row: purged,
    another cluster's), which no waiter waits out."""
    if not job_ids:
        return {}
    rows, queue_answered = commands.queued(job_ids, SQUEUE_FORMAT, runner)
    queued = {j: parse_squeue(rows, j) if rows is not None else None for j in job_ids}
    rest = [j for j in job_ids if queued[j] is None or queued[j].state not in LIVE]
    # An array task that never started has no row of its own, only one its array folds: asked by the array's id.
    arrays = sorted({j.partition("_")[0] for j in rest if "_" in j} - set(rest))
    asked = commands.sacct(rest + arrays, SACCT_FIELDS, runner=runner) if rest else None
    accounting = sacct_states(parse.unfolded(asked))
    out = {}
    for job_id in job_ids:
        accounted = accounting.get(job_id)
        found = current(queued[job_id], accounted and _where_it_ran(accounted, runner))
        if found is None and queue_answered:
            found = JobState(job_id, "LEFT_QUEUE")
        out[job_id] = found or JobState(job_id, "UNKNOWN")
    return out


# ---- the local runner (submitit's LocalExecutor) -------------------------------------------------

def _alive(pid: int) -> bool:
    """A running process: a zombie (exited, not yet reaped) counts as gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not re.search(r"^State:\s*Z", status, re.M)


def controller_pid(record: Record) -> int | None:
    """The local job's controller pid, if that process is still the one that runs this job."""
    if not record.job_id.isdigit():
        return None
    pid = int(record.job_id)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    # pids are reused: only a submitit controller for this very folder is ours.
    if "submitit.local._local" not in cmdline or str(record.submitit_dir) not in cmdline:
        return None
    return pid if _alive(pid) else None


def local_outcome(job_id: str, ntasks: int, files: Mapping[str, str], running: bool, batch_log: str = "") -> JobState:
    """A local job's state from its files in the submitit folder (name -> text) and its batch log, where the local
    runner names the task that failed first as srun does, in Slurm's words."""
    if running:
        return JobState(job_id, "RUNNING")
    if f"{job_id}_cancelled" in files:
        return JobState(job_id, "CANCELLED")
    texts = [files.get(f"{job_id}_{index}_exit", "").strip() for index in range(ntasks)]
    codes = [jobfiles.count(text) for text in texts]  # hpc.task writes 0-255; anything else is no status
    known = {i: c for i, c in enumerate(codes) if c is not None}
    first = failing_task(batch_log, known)
    if first is None or not known.get(first):  # the batch log's word, where the task's own status bears it out
        first = failing_task("", known)
    if first is not None:
        return JobState(job_id, "FAILED", codes[first])
    if any(c is None for c in codes):
        # A task that left no status died without running its command to the end (killed, timed out).
        return JobState(job_id, "FAILED", None)
    return JobState(job_id, "COMPLETED", 0)


def directory_gone(record: Record) -> bool:
    """Whether the job's directory has been deleted (or moved) since it was submitted."""
    return not Path(record.job_dir).is_dir()


def local_state(record: Record) -> JobState:
    """A local job's state from its submitit folder; LEFT_QUEUE (ended, how unknown) once that folder was deleted,
    since its task statuses went with it (a job still running is still RUNNING), so no waiter waits it out."""
    running = controller_pid(record) is not None
    if not running and directory_gone(record):
        return JobState(record.job_id, "LEFT_QUEUE")
    names = [f"{record.job_id}_cancelled"] + [f"{record.job_id}_{i}_exit" for i in range(record.ntasks)]
    files = {}
    for name in names:
        with contextlib.suppress(OSError, jobfiles.Damaged):
            files[name] = jobfiles.read_text(record.submitit_dir / name, 4096)
    batch_log = ""
    with contextlib.suppress(OSError, jobfiles.Damaged):
        batch_log = jobfiles.read_text(Path(record.job_dir) / vocab.batch_log(record.job_id), 4096)
    return local_outcome(record.job_id, record.ntasks, files, running, batch_log)


def states(records: Sequence[Record], runner: Runner = slurm_run) -> list[JobState]:
    """Every record's state, in their order, with one squeue and one sacct call for all of the Slurm jobs; not
    by job id: a local job's id is a pid, which a Slurm job's number may equal."""
    asked = slurm_states([r.job_id for r in records if r.via != "local"], runner)
    return [local_state(r) if r.via == "local" else asked[r.job_id] for r in records]


def state(record: Record, runner: Runner = slurm_run) -> JobState:
    return states([record], runner)[0]


def cancel(record: Record, runner: Runner = slurm_run) -> bool:
    """scancel the job; for a local job, SIGTERM its controller, which hands it to every task, as scancel does:
    each task's runner gives its ranks KillWait (task.STOP_GRACE_S) to checkpoint, then kills them. Whether there
    was a job to stop (a local job's controller may be gone already)."""
    if record.via != "local":
        try:
            commands.scancel([record.job_id], runner=runner, strict=True)
        except SlurmError as exc:
            raise JobError(str(exc)) from None
        return True
    pid = controller_pid(record)
    if pid is None:
        return False
    # A job whose folder was deleted while it runs is still stopped; only its status has nowhere to go.
    with contextlib.suppress(FileNotFoundError):
        (record.submitit_dir / f"{record.job_id}_cancelled").touch()
    # Not the SIGINT of submitit's LocalJob.cancel: the controller ignores it (hpc.submit._job_signals), and its
    # own stop on it kills the task runners 1 s later, the ranks' checkpoint with them.
    os.kill(pid, signal.SIGTERM)
    return True


def slurm_available(environ: Mapping[str, str]) -> bool:
    """Whether this machine can submit to Slurm at all (sbatch on PATH)."""
    return commands.available(environ, "sbatch")

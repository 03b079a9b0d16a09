"""Remember the jobs submitted from this machine, and ask Slurm (or the local runner) how each stands."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

HOME_ENV = "HPCDIST_HOME"
DEFAULT_HOME = "~/.hpcdist"
REGISTRY = "jobs.jsonl"
# Written into the job directory as well, so a job dir names its job even with another registry.
MARKER = "submitted.json"
SUBMITIT_DIR = "submitit"
VIAS = ("submitit", "sbatch", "local")
# Slurm's states after which a job never runs again (REQUEUED and PENDING are not among them).
# LEFT_QUEUE is ours, not Slurm's: the job is no longer queued but accounting (sacct) cannot say how it
# ended; a waiter must stop there rather than poll forever.
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE", "REVOKED", "LEFT_QUEUE")
SACCT_FIELDS = ("JobID", "State", "ExitCode", "NodeList", "Elapsed")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


class JobError(LookupError):
    """A job that cannot be found or asked about; the message is one line."""


@dataclass(frozen=True)
class Record:
    """One submission: what was asked for and where it went (one line of jobs.jsonl)."""

    job_id: str
    job_dir: str
    via: str
    submitted: str
    job_name: str = ""
    backend: str = ""
    launcher: str = ""
    nodes: int = 1
    ntasks_per_node: int = 1
    world_size: int = 1

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def submitit_dir(self) -> Path:
        return Path(self.job_dir) / SUBMITIT_DIR

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Record":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class JobState:
    """A job's state in Slurm's words, its exit status, and where it ran."""

    job_id: str
    state: str
    exit_code: int | None = None
    signal: int | None = None
    nodelist: str = ""
    elapsed: str = ""

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
        if self.nodelist and self.nodelist not in ("None assigned", "(null)"):
            parts.append(f"nodes={self.nodelist}")
        if self.elapsed:
            parts.append(f"elapsed={self.elapsed}")
        return "  ".join(parts)


# ---- the registry ------------------------------------------------------------------------------

def registry_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(HOME_ENV) or DEFAULT_HOME).expanduser() / REGISTRY


def parse_registry(text: str) -> list[Record]:
    """Records in submission order; a damaged line (a crash mid-write) is skipped, not fatal."""
    out = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
            if isinstance(data, dict) and data.get("job_id") and data.get("job_dir"):
                out.append(Record.from_mapping(data))
        except (ValueError, TypeError):
            continue
    return out


def load(path: Path) -> list[Record]:
    try:
        return parse_registry(path.read_text())
    except FileNotFoundError:
        return []


def append(path: Path, record: Record) -> None:
    """Add one line; a single short write to an O_APPEND file keeps concurrent submitters' lines whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(record.to_json() + "\n")


def write_marker(record: Record) -> None:
    (Path(record.job_dir) / MARKER).write_text(record.to_json() + "\n")


def read_marker(job_dir: Path) -> Record | None:
    try:
        records = parse_registry((job_dir / MARKER).read_text())
    except OSError:
        return None
    return records[-1] if records else None


def find(records: Iterable[Record], key: str, cwd: str = "/") -> Record | None:
    """The newest record whose job id is ``key``, or whose job dir is ``key`` (relative to ``cwd``)."""
    records = list(records)
    directory = os.path.normpath(os.path.join(cwd, key))
    for record in reversed(records):
        if record.job_id == key:
            return record
    for record in reversed(records):
        if os.path.normpath(record.job_dir) == directory:
            return record
    return None


def lookup(key: str, environ: Mapping[str, str]) -> Record:
    """Find JOB (a job id or a job dir) in the registry, else in the job dir's own marker."""
    record = find(load(registry_path(environ)), key, os.getcwd())
    if record is None and Path(key).is_dir():
        record = read_marker(Path(key).resolve())
    if record is None:
        raise JobError(f"no job {key!r} was submitted from here (see `hpcdist list`); pass a job id or a "
                       "job directory")
    return record


# ---- asking Slurm --------------------------------------------------------------------------------

def _exit_code(text: str) -> tuple[int | None, int | None]:
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def parse_sacct(text: str, job_id: str) -> JobState | None:
    """The allocation's row of ``sacct -X -n -P -o JobID,State,ExitCode,NodeList,Elapsed``."""
    for line in text.splitlines():
        cols = line.split("|")
        if len(cols) < len(SACCT_FIELDS) or cols[0] != job_id:
            continue
        # "CANCELLED by 0": the state is the first word.
        state = cols[1].split()[0] if cols[1].strip() else "UNKNOWN"
        code, sig = _exit_code(cols[2])
        return JobState(job_id, state, code, sig, cols[3], cols[4])
    return None


def parse_squeue(text: str, job_id: str) -> JobState | None:
    """A row of ``squeue -h -o %i|%T|%N|%M``."""
    for line in text.splitlines():
        cols = line.split("|")
        if len(cols) >= 4 and cols[0] == job_id:
            return JobState(job_id, cols[1], None, None, cols[2], cols[3])
    return None


def _run(argv: Sequence[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def slurm_state(job_id: str, runner: Runner = _run) -> JobState:
    """Accounting's view (it keeps finished jobs); the queue's while accounting has no row yet."""
    sacct = runner(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", ",".join(SACCT_FIELDS)])
    found = parse_sacct(sacct.stdout, job_id) if sacct.returncode == 0 else None
    if found is None or found.state == "UNKNOWN":
        squeue = runner(["squeue", "-h", "-j", job_id, "-o", "%i|%T|%N|%M"])
        queued = parse_squeue(squeue.stdout, job_id) if squeue.returncode == 0 else None
        found = queued or found
        # squeue answers "Invalid job id" (exit 1) for a job that has left the queue.
        gone = squeue.returncode == 0 or "Invalid job id" in squeue.stderr
        if found is None and sacct.returncode != 0 and gone:
            return JobState(job_id, "LEFT_QUEUE")
    return found or JobState(job_id, "UNKNOWN")


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


def local_outcome(job_id: str, ntasks: int, files: Mapping[str, str], running: bool) -> JobState:
    """A local job's state from its files in the submitit folder (name -> text), in Slurm's words."""
    if running:
        return JobState(job_id, "RUNNING")
    if f"{job_id}_cancelled" in files:
        return JobState(job_id, "CANCELLED")
    codes = []
    for index in range(ntasks):
        text = files.get(f"{job_id}_{index}_exit", "").strip()
        codes.append(int(text) if text.lstrip("-").isdigit() else None)
    first = failing_task("", {i: c for i, c in enumerate(codes) if c is not None})
    if first is not None:
        return JobState(job_id, "FAILED", codes[first])
    if any(c is None for c in codes):
        # A task that left no status died without running its command to the end (killed, timed out).
        return JobState(job_id, "FAILED", None)
    return JobState(job_id, "COMPLETED", 0)


def local_state(record: Record) -> JobState:
    folder = record.submitit_dir
    names = [f"{record.job_id}_cancelled"] + [f"{record.job_id}_{i}_exit" for i in range(record.ntasks)]
    files = {}
    for name in names:
        try:
            files[name] = (folder / name).read_text()
        except OSError:
            pass
    return local_outcome(record.job_id, record.ntasks, files, controller_pid(record) is not None)


def state(record: Record, runner: Runner = _run) -> JobState:
    if record.via == "local":
        return local_state(record)
    return slurm_state(record.job_id, runner)


def states(records: Sequence[Record], runner: Runner = _run) -> dict[str, JobState]:
    """Every record's state, with one sacct call for all of the Slurm jobs."""
    out = {r.job_id: local_state(r) for r in records if r.via == "local"}
    slurm_ids = [r.job_id for r in records if r.via != "local"]
    if slurm_ids:
        proc = runner(["sacct", "-X", "-n", "-P", "-j", ",".join(slurm_ids), "-o", ",".join(SACCT_FIELDS)])
        for job_id in slurm_ids:
            found = parse_sacct(proc.stdout, job_id) if proc.returncode == 0 else None
            out[job_id] = found or JobState(job_id, "UNKNOWN")
    return out


def cancel(record: Record, runner: Runner = _run) -> None:
    """scancel the job; for a local job, interrupt its controller, which stops every task."""
    if record.via != "local":
        done = runner(["scancel", record.job_id])
        if done.returncode != 0:
            raise JobError(f"scancel {record.job_id} failed: {(done.stderr or done.stdout).strip()}")
        return
    pid = controller_pid(record)
    if pid is None:
        return
    (record.submitit_dir / f"{record.job_id}_cancelled").touch()
    # SIGINT is what submitit's LocalJob.cancel sends: the controller then stops its tasks.
    os.kill(pid, signal.SIGINT)


# ---- logs ----------------------------------------------------------------------------------------

def log_files(record: Record, rank: int | None = None) -> list[Path]:
    """The job's logs: every task's (in task order) and the batch script's, or the one holding ``rank``."""
    logs = Path(record.job_dir) / "logs"
    if rank is not None:
        return [logs / f"task-{task_of(record, rank)}.log"]
    if not logs.is_dir():
        return []

    def order(path: Path) -> tuple[int, int, str]:
        m = re.fullmatch(r"task-(\d+)\.log", path.name)
        return (0, int(m.group(1)), "") if m else (1, 0, path.name)

    return sorted((p for p in logs.iterdir() if p.is_file()), key=order)


def task_of(record: Record, rank: int) -> int:
    """The Slurm task whose log holds ``rank``: itself under srun, its node's launcher otherwise."""
    if not 0 <= rank < max(record.world_size, 1):
        raise JobError(f"rank {rank} is outside world size {record.world_size}")
    per_task = max(record.world_size // max(record.ntasks, 1), 1)
    return rank // per_task


# srun's report of a task that ended badly: ``srun: error: n2: task 1: Killed``.
_SRUN_TASK_END = re.compile(r"^srun: error: (\S+): tasks? (\d+)(?:[-,]\d+)*: (.+)$", re.M)


def srun_first_failure(batch_log: str) -> tuple[int, str, str] | None:
    """(task, node, how) from srun's first report of a task that ended badly, if the log has one.

    The first report is the cause: srun --kill-on-bad-exit stops the other tasks only after it, and a
    rank that noticed its dead peer (a broken collective) exits after it too. That first task may have
    been killed (``Killed``: the OOM killer, kill -9) rather than have exited with a status.
    """
    m = _SRUN_TASK_END.search(batch_log)
    return (int(m.group(2)), m.group(1), m.group(3).strip()) if m else None


def failing_task(batch_log: str, exit_codes: Mapping[int, int]) -> int | None:
    """The task that failed first: srun's own report in the batch log, else a local non-zero status.

    srun prints ``srun: error: n2: task 1: Exited with exit code 3`` (or ``...: Killed``) for the task
    that failed; the others, stopped by --kill-on-bad-exit, follow as "Terminated"/"Killed" lines.
    """
    first = srun_first_failure(batch_log)
    if first is not None:
        return first[0]
    stopped_by_others = (128 + signal.SIGTERM, 128 + signal.SIGKILL)
    for index in sorted(exit_codes):
        if exit_codes[index] and exit_codes[index] not in stopped_by_others:
            return index
    for index in sorted(exit_codes):
        if exit_codes[index]:
            return index
    return None


def ranks_label(record: Record, index: int) -> str:
    """``rank 1`` or ``ranks 2-3``: the ranks Slurm task ``index`` ran (one per node under a launcher)."""
    per_task = max(record.world_size // max(record.ntasks, 1), 1)
    first, last = index * per_task, (index + 1) * per_task - 1
    return f"rank {first}" if first == last else f"ranks {first}-{last}"


def failure_report(record: Record, lines: int = 40) -> str:
    """The tail of the failing task's log, then of the batch log, for a job that did not complete."""
    logs = Path(record.job_dir) / "logs"
    batch = logs / f"batch-{record.job_id}.out"
    batch_text = tail(batch, 400)
    codes = {}
    for index in range(record.ntasks):
        try:
            codes[index] = int((record.submitit_dir / f"{record.job_id}_{index}_exit").read_text())
        except (OSError, ValueError):
            pass
    index = failing_task(batch_text, codes)
    chosen = [logs / f"task-{index}.log"] if index is not None else [
        p for p in log_files(record) if p.name.startswith("task-")]
    parts = []
    if index is not None:
        # One line naming who failed and where: a killed rank writes nothing, so its log tail can't say.
        first = srun_first_failure(batch_text)
        where, how = (f" on {first[1]}", f": {first[2]}") if first else ("", f": exit status {codes.get(index)}")
        parts.append(f"hpcdist: task {index} ({ranks_label(record, index)}){where} failed first{how}")
    for path in chosen:
        if path.exists():
            why = " (the failing task)" if index is not None else ""
            parts.append(f"==> {path}{why} <==\n{tail(path, lines)}")
    if batch_text:
        parts.append(f"==> {batch} <==\n" + "\n".join(batch_text.splitlines()[-10:]))
    return "\n".join(parts)


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file (reads at most the final 256 KiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - 262144, 0))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def slurm_available(environ: Mapping[str, str]) -> bool:
    """Whether this machine can submit to Slurm at all (sbatch on PATH)."""
    return shutil.which("sbatch", path=environ.get("PATH")) is not None

"""The registry of jobs submitted from this machine ($HPCDIST_HOME/jobs.jsonl) and each job directory's marker."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from hpc import fileio, jobfiles, vocab
from hpc.slurm import grammar

HOME_ENV = "HPCDIST_HOME"
DEFAULT_HOME = "~/.hpcdist"
REGISTRY = "jobs.jsonl"


class JobError(LookupError):
    """A job that cannot be found or asked about, or a registry no command may use; the message is one line."""


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
    spare_nodes: int = 0  # held beside ``nodes`` for a relaunch in the allocation (--spare-nodes)
    ntasks_per_node: int = 1
    world_size: int = 1
    previous: str = ""   # the job this one took over from, when its batch host died (hpc/rescue.py)

    def __post_init__(self) -> None:
        # A damaged line must not make a reader loop over 10^12 tasks or build a path the filesystem refuses.
        from hpc.spec import MAX_NODES, MAX_TASKS_PER_NODE, MAX_WORLD_SIZE
        from hpc.task import MAX_LOCAL_TASKS

        most = MAX_LOCAL_TASKS if self.via == "local" else MAX_WORLD_SIZE
        if not (self.job_id and self.job_dir and 1 <= self.nodes <= MAX_NODES and 0 <= self.spare_nodes <= MAX_NODES
                and 1 <= self.ntasks_per_node <= MAX_TASKS_PER_NODE and 1 <= self.world_size <= MAX_WORLD_SIZE
                and self.ntasks <= most):
            raise ValueError(f"job {self.job_id[:40]!r}: its geometry or names are out of range")
        if self.via != "local" and not grammar.is_job_id(self.job_id):
            raise ValueError(f"job {self.job_id[:40]!r} is not a Slurm job id")
        jobfiles.check_name(self.job_id, "job id")

    @property
    def ntasks(self) -> int:
        return self.nodes * self.ntasks_per_node

    @property
    def submitit_dir(self) -> Path:
        return Path(self.job_dir) / vocab.SUBMITIT_DIR

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def registry_path(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(HOME_ENV) or DEFAULT_HOME).expanduser() / REGISTRY


def parse_registry(text: str) -> list[Record]:
    """Records in submission order; a damaged line (a crash mid-write, a hand edit) is skipped, not fatal."""
    out = []
    for data in jobfiles.json_lines(text):
        try:
            out.append(jobfiles.typed(Record, data))
        except (ValueError, TypeError):
            continue
    return out


# What follows every refusal of the registry: moving it is the user's call, never hpcdist's.
_FIX = "move it away, or set HPCDIST_HOME to a folder of your own"


def load(path: Path) -> list[Record]:
    """The registry's records, none before the first submission; a registry over jobfiles' size bound keeps its
    newest lines. JobError for one that is there but no file of its own (a link, a folder) or unreadable, which no
    command may take for "no jobs"."""
    try:
        data = jobfiles.read_bytes(path, jobfiles.MAX_BYTES, tail=True)
    except FileNotFoundError:
        return []
    except jobfiles.Damaged as exc:
        raise JobError(f"job registry: {exc}; {_FIX}") from None
    return parse_registry(data.decode("utf-8", errors="replace"))


def append(path: Path, record: Record) -> None:
    """Add one line; a single short write to an O_APPEND file keeps concurrent submitters' lines whole. JobError, as
    ``load``'s, for a registry that became no file of its own (a link, a folder) since ``writable`` passed it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fileio.append_line(path, record.to_json())
    except fileio.UnsafePath as exc:
        writable(path)  # the registry's own line for what is there
        raise JobError(f"job registry: {exc}") from None  # only if it turned back into a file meanwhile


def writable(path: Path) -> None:
    """JobError, creating nothing, for a registry that could not take a line: one that load refuses, one this user
    may not append to, or none and no folder this user may create it in. Asked before a job is submitted, since
    one Slurm runs must not go unregistered, and a refused submission leaves nothing behind."""
    try:
        if os.path.lexists(path):
            jobfiles.open_regular(path).close()
            fileio.open_own(path, append=True).close()
            return
    except jobfiles.Damaged as exc:
        raise JobError(f"job registry: {exc}; {_FIX}") from None
    except OSError as exc:
        raise JobError(f"job registry: cannot write {path}: {exc.strerror or exc}; {_FIX}") from None
    folder = Path(path).parent
    while not os.path.lexists(folder):
        folder = folder.parent
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise JobError(f"job registry: cannot create {path}: {folder} is no folder this user may write; set "
                       "HPCDIST_HOME to one")


def write_marker(record: Record) -> None:
    """The record written into its job directory as well, so a job dir names its job even with another registry."""
    fileio.atomic_write(Path(record.job_dir) / vocab.SUBMITTED_JSON, record.to_json() + "\n")


def read_marker(job_dir: Path) -> Record | None:
    try:
        records = parse_registry(jobfiles.read_text(job_dir / vocab.SUBMITTED_JSON, 65536))
    except (OSError, jobfiles.Damaged):
        return None
    return records[-1] if records else None


def find(records: Iterable[Record], key: str, cwd: str = "/") -> Record | None:
    """The newest record whose job id is ``key``, or whose job dir is ``key`` (relative to ``cwd``)."""
    newest_first = list(records)[::-1]
    directory = os.path.normpath(os.path.join(cwd, key))
    return (next((r for r in newest_first if r.job_id == key), None)
            or next((r for r in newest_first if os.path.normpath(r.job_dir) == directory), None))


def array_tasks(key: str, records: Sequence[Record]) -> list[Record]:
    """The tasks (``KEY_0``, ``KEY_1``, ...) among ``records`` of the job array whose own id is ``key``, as a sweep
    registers them; none where ``key`` is no such id or a job of its own has it, JobError where both do (a local
    job's id is a pid, which an array's may equal), as ``lookup`` refuses one id naming jobs in several directories."""
    if not grammar.is_job_id(key) or "_" in key:
        return []
    tasks = [r for r in records if r.via != "local" and r.job_id.partition("_")[0] == key and "_" in r.job_id]
    own = next((r.job_dir for r in reversed(records) if r.job_id == key), None)
    if tasks and own:
        raise JobError(f"job id {key} names a job submitted from here, in {ascii(own)}, and job array {key} "
                       f"({tasks[0].job_id}, ...): pass that job's directory, or the array's task ids")
    return [] if own else tasks


def lookup(key: str, environ: Mapping[str, str], one: bool = False, records: Sequence[Record] | None = None) -> Record:
    """Find JOB (a job id or a job dir) in the registry (``records``: as the caller read it), else in the job dir's
    own marker; ``one``: JobError for an id that names jobs in several directories (a local job's id is a pid, which
    a Slurm job's number may equal), where acting on the newest could stop the wrong one."""
    try:
        jobfiles.check_name(key, "job")
    except ValueError as exc:
        raise JobError(str(exc)) from None
    records = load(registry_path(environ)) if records is None else records
    record = find(records, key, os.getcwd())
    dirs = sorted({os.path.normpath(r.job_dir) for r in records if r.job_id == key}) if one else []
    if len(dirs) > 1:
        raise JobError(f"job id {key} names {len(dirs)} jobs submitted from here, in {', '.join(map(ascii, dirs[:3]))}"
                       ": pass the job directory of the one you mean")
    if record is None and Path(key).is_dir():
        record = read_marker(Path(key).resolve())
        if record is not None and os.path.realpath(record.job_dir) != os.path.realpath(key):
            # A copied or forged marker: reading (and writing a report) would reach another directory.
            raise JobError(f"{ascii(key)[1:-1]}/{vocab.SUBMITTED_JSON} names another job directory "
                           f"({ascii(record.job_dir[:200])[1:-1]}); pass that directory or the job id")
    if record is None:
        raise JobError(f"no job {key!r} was submitted from here (see `hpcdist list`); pass a job id or a "
                       "job directory")
    return record

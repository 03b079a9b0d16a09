"""One function per request hpcdist makes of Slurm; each returns Slurm's text (or None where Slurm did not
answer) for a parser to read, and takes ``runner`` so tests can answer for Slurm.

    show("partition")                  # scontrol show partition -o
    sacct(["42", "43"], ("JobID", "State"))
    sbatch(script)                     # the job id, or SlurmError
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hpc import jobfiles
from hpc.ranks import PICKED_MASTER_PORT
from hpc.slurm import grammar, parse
from hpc.slurm.runner import Runner, SlurmError, complaint, run


def available(environ: Mapping[str, str], command: str = "scontrol") -> bool:
    """Whether this machine can speak to Slurm at all (its commands are on PATH)."""
    return shutil.which(command, path=environ.get("PATH")) is not None


def _answer(argv: Sequence[str], runner: Runner) -> str | None:
    proc = runner(argv)
    return proc.stdout if proc.returncode == 0 else None


# Slurm takes a job list as one argument, and exec no argument over 128 KiB (MAX_ARG_STRLEN): longer lists are
# asked in parts this size, well below it at the 20 characters of an array task's id.
JOBS_PER_CALL = 1000


def _lists(jobs: Sequence[str]) -> list[str]:
    """``jobs`` as the comma-separated ``-j`` arguments of the calls that ask about them all."""
    return [",".join(jobs[i:i + JOBS_PER_CALL]) for i in range(0, len(jobs), JOBS_PER_CALL)]


def _answers(argv_of: Callable[[str], list[str]], jobs: Sequence[str], runner: Runner) -> str | None:
    """Every part's answer to ``argv_of(JOBLIST)`` joined, or None where any part's call failed."""
    texts = [_answer(argv_of(part), runner) for part in _lists(jobs)]
    return None if None in texts else "".join(texts)


def _not_jobs(jobs: Sequence[str]) -> list[str]:
    """What in ``jobs`` is no job id, or ``[""]`` for no job at all: a command given either is not run (see grammar)."""
    return [job for job in jobs if not grammar.is_job_id(job)] if jobs else [""]


def show(what: str, *names: str, runner: Runner = run) -> str | None:
    """``scontrol show WHAT [NAMES] -o`` (one record a line); ``config`` has no one-line form."""
    if what == "job" and _not_jobs(names):
        return None
    return _answer(["scontrol", "show", what, *names] + ([] if what == "config" else ["-o"]), runner)


# squeue folds an array's pending tasks into one row (``1234_[2-3]``) when asked about several jobs or the queue: a
# task's own id then matches no row, and a pending task read as one that had left the queue.
ARRAY_TASK_A_ROW = "--array"


def squeue(fmt: str, *, jobs: Sequence[str] = (), states: str | None = None, partitions: Sequence[str] = (),
           runner: Runner = run) -> str | None:
    """``squeue -h -o FMT`` for these jobs, or the queue's jobs in these states and partitions."""
    if jobs and _not_jobs(jobs):
        return None
    argv = (["squeue", "-h", "-o", fmt, ARRAY_TASK_A_ROW] + (["-t", states] if states else [])
            + (["-p", ",".join(partitions)] if partitions else []))
    if jobs:
        return _answers(lambda part: [*argv, "-j", part], jobs, runner)
    return _answer(argv, runner)


def queued(jobs: Sequence[str], fmt: str, runner: Runner = run) -> tuple[str | None, bool]:
    """(``squeue -h -j JOBS -o FMT``'s rows or None, whether the controller answered): "Invalid job id" is an
    answer, that it holds none of them any more."""
    if _not_jobs(jobs):
        return None, False
    texts = []
    for part in _lists(jobs):
        proc = runner(["squeue", "-h", "-j", part, "-o", fmt, ARRAY_TASK_A_ROW])
        if proc.returncode == 0:
            texts.append(proc.stdout)
        elif "Invalid job id" not in (proc.stderr or ""):
            return None, False
    return ("".join(texts) if texts else None), True


def sacct(jobs: Sequence[str], fields: Sequence[str], *, duplicates: bool = False,
          runner: Runner = run) -> str | None:
    """``sacct -X -n -P -j JOBS -o FIELDS``: one ``|``-separated row per allocation (``-D``: every run of a
    requeued job, not only its newest)."""
    if _not_jobs(jobs):
        return None
    return _answers(lambda part: ["sacct", *(["-D"] if duplicates else []), "-X", "-n", "-P", "-j", part, "-o",
                                  ",".join(fields)], jobs, runner)


# What a batch shell exports for the step it relaunches, and the local runner for its tasks: the old job's, never a
# new job's.
HPCDIST_JOB_VARIABLES = ("HPCDIST_ATTEMPT", "HPCDIST_EXCLUDE", "HPCDIST_ELASTIC_NODES", PICKED_MASTER_PORT)


def new_job_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a job submitted from ``environ`` starts from: none of the variables of a job that shell
    runs in (an salloc, an interactive step, a batch shell submitting again), which sbatch would hand on and
    Slurm overwrites only where it sets its own: a stale SLURM_STEP_ID makes the new batch shell pass for a task,
    a stale SLURM_ARRAY_JOB_ID names it after another job. SLURM_CONF names the cluster and stays."""
    return {k: v for k, v in environ.items()
            if not ((k.startswith("SLURM_") and k != "SLURM_CONF") or k in HPCDIST_JOB_VARIABLES)}


def sbatch(script: Path, runner: Runner | None = None, options: Sequence[str] = (),
           env: Mapping[str, str] | None = None) -> str:
    """``sbatch --parsable [OPTIONS] SCRIPT``: the new job's id, or SlurmError. ``options`` win over the
    script's own #SBATCH lines; ``env``: the environment the job starts from (sbatch exports it)."""
    argv = ["sbatch", "--parsable", *options, str(script)]
    # From the script's own directory: the job's working directory is then the job directory.
    proc = runner(argv) if runner else run(argv, cwd=str(Path(script).parent), env=env)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {complaint(proc)}")
    job_id = parse.sbatch_job_id(proc.stdout)
    if job_id is None:
        raise SlurmError(f"sbatch printed no job id: {proc.stdout.strip()!r}")
    return job_id


def sbatch_test_only(script: Path, runner: Runner = run) -> tuple[int, str]:
    """``sbatch --test-only SCRIPT``: (status, what Slurm answered)."""
    proc = runner(["sbatch", "--test-only", str(script)])
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def scancel(jobs: Sequence[str], signal: str | None = None, runner: Runner = run, strict: bool = False) -> bool:
    """``scancel [--signal=SIG] JOBS``; whether Slurm took it (``strict``: SlurmError naming why not)."""
    if bad := _not_jobs(jobs):
        if strict:
            raise SlurmError(f"scancel was not run: {bad[0][:40]!r} is no Slurm job id")
        return False
    proc = runner(["scancel", *([f"--signal={signal}"] if signal else []), *jobs])
    if strict and proc.returncode != 0:
        raise SlurmError(f"scancel failed: {complaint(proc)}")
    return proc.returncode == 0


SLURMD_PORT = 6818  # Slurm's default SlurmdPort


def slurmd_port(runner: Runner = run) -> int:
    """The cluster's SlurmdPort (``scontrol show config``), else Slurm's default."""
    port = jobfiles.count(parse.config(show("config", runner=runner)).get("SlurmdPort", ""))
    return port if port is not None else SLURMD_PORT


def slurmd_answers(node: str, port: int = SLURMD_PORT, timeout_s: float = 1.0) -> bool:
    """Whether the node's slurmd accepts a connection: refused or unanswered, the node is gone (Slurm itself
    decides only after SlurmdTimeout, minutes later)."""
    try:
        with socket.create_connection((node, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def sinfo_nodes(partition: str | None = None, nodes: Sequence[str] = (), runner: Runner = run) -> str | None:
    """``sinfo -h -N -o %N|%T``: one ``node|state`` line per node (of a partition, or of these nodes)."""
    argv = ["sinfo", "-h", "-N", "-o", "%N|%T"] + (["-p", partition] if partition else [])
    return _answer(argv + (["-n", ",".join(nodes)] if nodes else []), runner)


def update(what: str, name: str, runner: Runner = run, **fields: str) -> bool:
    """``scontrol update JobId=NAME K=V ...`` (``what`` "job") or ``NodeName=NAME ...`` ("node"); whether
    Slurm took it."""
    key = {"job": "JobId", "node": "NodeName"}[what]
    if what == "job" and _not_jobs([name]):
        return False
    return runner(["scontrol", "update", f"{key}={name}", *(f"{k}={v}" for k, v in fields.items())]).returncode == 0


def start_now(job: str, runner: Runner = run, **fields: str) -> bool:
    """``scontrol update JobId=JOB StartTime=now``: a pending job is considered at once, not at the next
    scheduling pass; whether Slurm took it. ``fields``: more to change in the same request (ExcNodeList)."""
    return update("job", job, runner, StartTime="now", **fields)

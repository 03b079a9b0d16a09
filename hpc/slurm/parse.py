"""Slurm's command output read back into plain values: one reader per output form.

    keyvalues(show("job", "42"))                        # scontrol show ... -o: {"JobState": "RUNNING", ...}
    records(show("partition"))                          # one dict per partition
    config(show("config"))                              # scontrol show config: {"SlurmdPort": "6818", ...}
    rows(sacct(["42"], FIELDS), FIELDS, job="42")       # sacct -P / squeue -o "%i|%T": one dict per row
    node_states(sinfo_nodes())                          # sinfo -N -o %N|%T: {"n1": "idle", ...}
    sbatch_job_id("4242;cluster\n")                     # sbatch --parsable: "4242"
    unfolded("7_0|DONE\n7_[1-2]|PENDING\n")           # sacct -P, one row a task: "7_0|DONE\n7_1|PENDING\n..."
"""

from __future__ import annotations

import re
from typing import Sequence

from hpc.slurm import grammar

# A key starts a word; its value runs to the next key, so values with spaces (Reason=Not responding) stay whole.
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/.]*)=")
# Slurm's state suffixes: * not responding, ~ powered off, # powering up, ! powering down, % powering off,
# $ maintenance, @ reboot pending, ^ rebooting, - planned.
_STATE_FLAGS = "*~#!%$@^-"


def record(line: str) -> dict[str, str]:
    """One line of ``scontrol show job|node|partition -o`` as its Key=value pairs."""
    pieces = _KEY.split(line)  # text before the first key, then key, value, key, value, ...
    return {key: value.strip() for key, value in zip(pieces[1::2], pieces[2::2])}


def records(text: str | None) -> list[dict[str, str]]:
    """Every record of ``scontrol show WHAT -o`` (one a line)."""
    return [r for line in (text or "").splitlines() if (r := record(line))]


def keyvalues(text: str | None) -> dict[str, str]:
    """The first record of ``scontrol show job|node -o`` (a job or node asked for by name), or {}."""
    return next(iter(records(text)), {})


def config(text: str | None) -> dict[str, str]:
    """``scontrol show config``'s ``Key = value`` lines."""
    pairs = (line.partition("=") for line in (text or "").splitlines())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep and key.strip() and " " not in key.strip()}


def rows(text: str | None, fields: Sequence[str], job: str | None = None) -> list[dict[str, str]]:
    """``|``-separated rows (``sacct -P -o F1,F2``, ``squeue -o %i|%T``) as dicts of ``fields``, in Slurm's
    order; a short row is skipped. ``job``: only the rows of that job id (its first field)."""
    split = [line.split("|") for line in (text or "").splitlines()]
    return [dict(zip(fields, (c.strip() for c in cols))) for cols in split
            if len(cols) >= len(fields) and (job is None or cols[0].strip() == job)]


def array_tasks(job_field: str) -> tuple[str, list[int]]:
    """sacct's JobID of an array's row as (array job id, task ids): ``7_3`` -> ("7", [3]); a pending row folds
    its tasks, ``7_[2-5%2]`` or ``7_[1,4-6]``; a plain job ``7`` -> ("7", [])."""
    job, _, task = job_field.strip().partition("_")
    tasks: list[int] = []
    for part in filter(None, task.strip("[]").split("%")[0].split(",")):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            tasks.extend(range(int(lo), int(hi or lo) + 1))
    return job, tasks


def unfolded(text: str | None) -> str:
    """``sacct -P`` rows, each folded row of an array's tasks that never started (``7_[2-4%2]|...``) as one row per
    task (``7_2|...``, ``7_3|...``, ``7_4|...``): sacct keeps no row under such a task's own id."""
    out = []
    for line in (text or "").splitlines():
        first, bar, rest = line.partition("|")
        job, tasks = array_tasks(first)
        out += [f"{job}_{t}{bar}{rest}" for t in tasks] if "[" in first else [line]
    return "".join(f"{line}\n" for line in out)


def sbatch_job_id(text: str | None) -> str | None:
    """The job id ``sbatch --parsable`` printed (``ID`` or ``ID;CLUSTER``, after any warnings), or None."""
    lines = (text or "").strip().splitlines()
    first = lines[-1].split(";")[0].strip() if lines else ""
    return first if grammar.is_job_id(first) else None


def node_state(text: str) -> str:
    """A node state as sinfo prints it (``idle*``, ``MIXED+DRAIN``) reduced to its base word in lower case."""
    return text.strip().lower().split("+")[0].rstrip(_STATE_FLAGS)


def node_states(text: str | None) -> dict[str, str]:
    """``sinfo -h -N -o %N|%T``: node -> state (lower case, without Slurm's flag suffixes)."""
    return {r["node"]: r["state"].strip().lower().rstrip(_STATE_FLAGS) for r in rows(text, ("node", "state"))}

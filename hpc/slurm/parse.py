"""Slurm's command output read back into plain values: one reader per output form.

    keyvalues(show("job", "42"))                        # scontrol show ... -o: {"JobState": "RUNNING", ...}
    records(show("partition"))                          # one dict per partition
    config(show("config"))                              # scontrol show config: {"SlurmdPort": "6818", ...}
    rows(sacct(["42"], FIELDS), FIELDS, job="42")       # sacct -P / squeue -o "%i|%T": one dict per row
    node_states(sinfo_nodes())                          # sinfo -N -o %N|%T: {"n1": "idle", ...}
"""

from __future__ import annotations

import re
from typing import Sequence

# A key starts a word; its value runs to the next key, so values with spaces (Reason=Not responding) stay whole.
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/.]*)=")
# Slurm's state suffixes: * not responding, ~ powered off, # powering up, ! powering down, % powering off,
# $ maintenance, @ reboot pending, ^ rebooting, - planned.
_STATE_FLAGS = "*~#!%$@^-"


def record(line: str) -> dict[str, str]:
    """One line of ``scontrol show job|node|partition -o`` as its Key=value pairs."""
    marks = list(_KEY.finditer(line))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(line)
        out[m.group(1)] = line[m.end():end].strip()
    return out


def records(text: str | None) -> list[dict[str, str]]:
    """Every record of ``scontrol show WHAT -o`` (one a line)."""
    return [r for line in (text or "").splitlines() if (r := record(line))]


def keyvalues(text: str | None) -> dict[str, str]:
    """The first record of ``scontrol show job|node -o`` (a job or node asked for by name), or {}."""
    found = records(text)
    return found[0] if found else {}


def config(text: str | None) -> dict[str, str]:
    """``scontrol show config``'s ``Key = value`` lines."""
    out = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


def rows(text: str | None, fields: Sequence[str], job: str | None = None) -> list[dict[str, str]]:
    """``|``-separated rows (``sacct -P -o F1,F2``, ``squeue -o %i|%T``) as dicts of ``fields``, in Slurm's
    order; a short row is skipped. ``job``: only the rows of that job id (its first field)."""
    out = []
    for line in (text or "").splitlines():
        cols = line.split("|")
        if len(cols) < len(fields) or (job is not None and cols[0].strip() != job):
            continue
        out.append(dict(zip(fields, (c.strip() for c in cols))))
    return out


def node_state(text: str) -> str:
    """A node state as sinfo prints it (``idle*``, ``MIXED+DRAIN``) reduced to its base word in lower case."""
    return text.strip().lower().split("+")[0].rstrip(_STATE_FLAGS)


def node_states(text: str | None) -> dict[str, str]:
    """``sinfo -h -N -o %N|%T``: node -> state (lower case, without Slurm's flag suffixes)."""
    return {r["node"]: r["state"].strip().lower().rstrip(_STATE_FLAGS) for r in rows(text, ("node", "state"))}

"""Build DeepSpeed's hostfile and its launcher's base64 ``--world_info`` from a Slurm nodelist (pure)."""

from __future__ import annotations

import base64
import json
import re
from typing import Mapping

from hpc import nodelist, shown
from hpc.ranks import SLURM, count_of
from hpc.spec import MAX_TASKS_PER_NODE

# What a hostfile line (``host slots=N``) can carry as its host: a blank or ``=`` would be read as more fields.
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class HostfileError(ValueError):
    """No hosts or slots to build a hostfile from; the message names the fix."""


def hosts(expr: str) -> list[str]:
    """The host names of a Slurm nodelist, each one a hostfile can carry.

    Slurm reads blanks as separators (``n1 slots=99`` is two hosts); a nodelist given here is one word, as
    ``--nodelist`` must be at render.
    """
    if any(ch.isspace() or not ch.isprintable() for ch in expr):
        raise HostfileError(f"nodelist {shown.value(expr)} contains whitespace or a control character; give one "
                            "Slurm nodelist such as n[1-2]")
    return nodelist.expand_for("nodelist", expr, HostfileError)


def slots_from_slurm(environ: Mapping[str, str]) -> int:
    """Ranks per node inside a job: the GPUs Slurm gave this node, else one."""
    return count_of(environ, "SLURM_GPUS_ON_NODE") or 1


def nodelist_from_slurm(environ: Mapping[str, str]) -> str:
    """The hosts SLURM_NODEID indexes: inside a step the step's (perhaps part of the allocation), else the job's."""
    expr = next((environ[name] for name in SLURM["nodelist"] if environ.get(name)), None)
    if not expr:
        raise HostfileError("SLURM_JOB_NODELIST is not set: run inside a Slurm job or pass --nodelist")
    return expr


def _check(names: list[str], slots: int) -> None:
    bad = next((n for n in names if not _HOST.fullmatch(n)), None)
    if bad is not None:
        raise HostfileError(f"host {shown.value(bad)} is not a host name (letters, digits, '.', '-', '_'); "
                            "fix the nodelist")
    if slots < 1:
        raise HostfileError(f"--slots {slots}: each host needs at least one slot")
    if slots > MAX_TASKS_PER_NODE:
        raise HostfileError(f"--slots {slots} is over the limit of {MAX_TASKS_PER_NODE:,} ranks per node; "
                            "ask for fewer")


def hostfile(names: list[str], slots: int) -> str:
    """DeepSpeed's hostfile: ``host slots=N`` per line."""
    _check(names, slots)
    return "".join(f"{name} slots={slots}\n" for name in names)


def world_info(names: list[str], slots: int) -> str:
    """What ``deepspeed.launcher.launch --world_info`` decodes: base64(JSON {host: [slot ids]}).

    Encoded as DeepSpeed's own runner does (urlsafe base64 of compact-enough JSON), so the launcher's
    ``urlsafe_b64decode`` reads it back; key order is the node order SLURM_NODEID indexes.
    """
    _check(names, slots)
    info = {name: list(range(slots)) for name in names}
    return base64.urlsafe_b64encode(json.dumps(info).encode()).decode()

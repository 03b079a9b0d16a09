"""Slurm's written forms read as numbers: durations, timestamps, ExitCode.

    duration_s("1-02:03:04")      -> 93784      (TimeLimit, RunTime, Elapsed; None for UNLIMITED)
    timestamp("2026-12-01T08:22:20") -> unix time (Submit, Start, End; None for Unknown)
    exit_code("0:9")              -> (0, 9)     (status, signal)
    is_job_id("123_4")            -> True       (a job or an array task, as sbatch numbers them)
"""

from __future__ import annotations

import datetime
import re

_DURATION = re.compile(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)(?:\.\d+)?")
# Jobs are numbered from 1. Given as a job, "0" is every job to scontrol and sacct, "--me" every one of the
# user's to scancel: a damaged or forged record must never reach them.
_JOB_ID = re.compile(r"[1-9][0-9]*(?:_[0-9]+)?")


def is_job_id(text: object) -> bool:
    """Whether ``text`` names one job or one array task as sbatch numbers them (``123``, ``123_4``)."""
    return isinstance(text, str) and _JOB_ID.fullmatch(text) is not None


def duration_s(text: str) -> int | None:
    """Slurm's ``[D-][HH:]MM:SS`` as printed by scontrol, squeue and sacct, in seconds; None for the unset forms
    (UNLIMITED, INFINITE, N/A, ...), which hold no digits."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def format_duration(seconds: int) -> str:
    """Seconds as Slurm's ``[D-]HH:MM:SS``."""
    days, rest = divmod(int(seconds), 86400)
    text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def timestamp(text: str) -> float | None:
    """Slurm's ``2026-12-01T08:22:20`` (the controller's local time) as a unix time; None for Unknown/None."""
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def exit_code(text: str) -> tuple[int, int] | None:
    """sacct's ExitCode ``N:S``: the exit status and the signal that ended the job; None when unreadable."""
    m = re.fullmatch(r"\s*(\d+):(\d+)\s*", text)
    return (int(m.group(1)), int(m.group(2))) if m else None

"""Run one Slurm command, bounded in time, the same way for every caller.

    run(["squeue", "-h", "-j", "42"])          # CompletedProcess; a missing or hung command too

Tests pass their own ``runner`` (a function of the argv) wherever a function here takes one: that is
the fake Slurm.
"""

from __future__ import annotations

import subprocess
from typing import Callable, Mapping, Sequence

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

# One policy: a submission may wait for a busy controller; a change to a job (scancel, scontrol update,
# requeue) a little; a question holds nobody up for long: render and status ask and give up quietly. What
# did not answer in time is a failed command (status 124).
SUBMIT_TIMEOUT_S = 120
CHANGE_TIMEOUT_S = 30
QUERY_TIMEOUT_S = 15
_CHANGES = ("update", "requeue", "requeuehold", "release", "hold")


class SlurmError(RuntimeError):
    """A Slurm command that failed, named with its own one-line complaint."""


def timeout_of(argv: Sequence[str]) -> int:
    if argv[0] == "sbatch" and "--test-only" not in argv:
        return SUBMIT_TIMEOUT_S
    if argv[0] == "scancel" or (argv[0] == "scontrol" and len(argv) > 1 and argv[1] in _CHANGES):
        return CHANGE_TIMEOUT_S
    return QUERY_TIMEOUT_S


def run(argv: Sequence[str], cwd: str | None = None,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` run to its end (in ``env``, else this process's environment); a command that is missing (127)
    or does not answer in time (124) is a failed run like any other, never an exception."""
    argv = [str(a) for a in argv]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_of(argv), cwd=cwd,
                              env=None if env is None else dict(env))
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]} did not answer in {timeout_of(argv)} s")
    except OSError as exc:
        return subprocess.CompletedProcess(argv, 127, "", f"cannot run {argv[0]}: {exc.strerror or exc}")


def complaint(proc: subprocess.CompletedProcess[str]) -> str:
    """The first line Slurm said about a failed command (its stderr, else stdout), without its prefix."""
    for text in (proc.stderr, proc.stdout):
        for line in (text or "").splitlines():
            line = line.strip()
            if line:
                return line.removeprefix(f"{proc.args[0]}: ").removeprefix("error: ")
    return f"{proc.args[0]} exited {proc.returncode}"

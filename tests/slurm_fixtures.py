"""Shared helpers for the submit tests: run hpcdist, detect the local Slurm, check a training summary."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

REPO = Path(__file__).resolve().parent.parent
# Tiny training: the point is the plumbing, not the model (each job takes 20-70 s on this box).
TINY_TRAIN = ("--max-steps", "30", "--dataset", "synthetic", "--synthetic-size", "1024", "--batch-size", "64")
SLURM_COMMANDS = ("sbatch", "srun", "salloc", "squeue", "sinfo", "scancel", "sacct", "scontrol", "sacctmgr",
                  "sstat", "sattach", "sbcast", "sprio", "sshare", "sreport", "sdiag", "strigger", "sview")


@functools.lru_cache(maxsize=1)
def slurm_reachable() -> bool:
    """Whether sinfo reaches a controller with at least one responding node."""
    if shutil.which("sinfo") is None:
        return False
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


requires_slurm = pytest.mark.skipif(not slurm_reachable(),
                                    reason="no Slurm controller answers sinfo (bash scripts/slurm-local.sh start "
                                           "multi --dbd)")


def environ(home: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment: this checkout importable, a private job registry."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HPCDIST_HOME"] = str(home)
    env.update(extra)
    return env


def hpcdist(args: Sequence[str], home: Path, timeout: float = 600, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hpc ARGS`` as a user would, capturing its output."""
    return subprocess.run([sys.executable, "-m", "hpc", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(env) if env is not None else environ(home), cwd=cwd or REPO)


def job_id_of(stdout: str) -> str:
    """The id from ``Submitted job ID (via): DIR``."""
    for line in stdout.splitlines():
        if line.startswith("Submitted job "):
            return line.split()[2]
    raise AssertionError(f"no 'Submitted job' line in:\n{stdout}")


def path_without_slurm(tmp: Path) -> str:
    """A PATH like this one with every Slurm command hidden (/bin is /usr/bin on Debian: mirror it)."""
    shadow = tmp / "no-slurm-bin"
    shadow.mkdir(exist_ok=True)
    entries = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not directory or not os.path.isdir(directory):
            continue
        names = os.listdir(directory)
        if not any(n in SLURM_COMMANDS for n in names):
            entries.append(directory)
            continue
        for name in names:
            if name not in SLURM_COMMANDS and not (shadow / name).exists():
                (shadow / name).symlink_to(os.path.join(directory, name))
        if str(shadow) not in entries:
            entries.append(str(shadow))
    return os.pathsep.join(entries)


def read_summary(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / "run" / "summary.json").read_text())


def check_training(job_dir: Path, world_size: int, hosts: Sequence[str] | None, master: str | None) -> dict:
    """The trainer's summary shows the asked-for world, rank placement and a run that learned alike."""
    summary = read_summary(job_dir)
    ranks = sorted(summary["ranks"], key=lambda r: r["rank"])
    assert summary["world_size"] == world_size, summary
    assert [r["rank"] for r in ranks] == list(range(world_size)), ranks
    if hosts is not None:
        assert sorted({r["hostname"] for r in ranks}) == sorted(hosts), ranks
    if master is not None:
        assert {r["master_addr"] for r in ranks} == {master}, ranks
    assert len({r["master_port"] for r in ranks}) == 1, ranks
    assert len({r["param_digest"] for r in ranks}) == 1, ranks
    assert summary["final_loss"] < summary["first_loss"], summary
    assert summary["steps"] == 30, summary
    return summary


def read_bytes(path: Path) -> bytes:
    """A /proc file's bytes, or none when its process has gone meanwhile."""
    try:
        return path.read_bytes()
    except OSError:
        return b""

"""On the local cluster: a drafted profile renders a job Slurm accepts, a partition's MaxTime and DefaultTime
apply at render, and a job pending behind a running 3-node job is explained by `hpcdist status`."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from slurm_fixtures import environ, hpcdist, job_id_of, requires_slurm

pytestmark = [pytest.mark.slurm, requires_slurm]

SHORT = "hpcdist-short"


def scontrol(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def short_partition() -> Iterator[None]:
    """Partition hpcdist-short (MaxTime 5, DefaultTime 2 minutes) on n[1-3], made at runtime unless slurm.conf
    already has it (scripts/slurm-local.sh writes it for fresh clusters); deleted again if made here."""
    existing = scontrol("show", "partition", SHORT, "-o")
    made = existing.returncode != 0
    if made:
        created = scontrol("create", f"PartitionName={SHORT}", "Nodes=n[1-3]", "MaxTime=5", "DefaultTime=2")
        assert created.returncode == 0, created.stderr
    else:
        assert "MaxTime=00:05:00" in existing.stdout and "DefaultTime=00:02:00" in existing.stdout, existing.stdout
    try:
        yield
    finally:
        if made:
            scontrol("delete", f"PartitionName={SHORT}")


def test_profile_init_drafts_a_profile_that_renders_a_job_slurm_accepts(tmp_path: Path) -> None:
    drafted = tmp_path / "site.yaml"
    made = hpcdist(["profile", "init", "-o", str(drafted)], tmp_path, timeout=60)
    assert made.returncode == 0, made.stderr
    data = yaml.safe_load(drafted.read_text())
    assert data["partition"] == "debug" and data["slurm_cluster"] == "local" and data["max_nodes"] == 3
    checked = hpcdist(["profile", "check", str(drafted)], tmp_path, timeout=60)
    assert checked.returncode == 0 and "fits Slurm cluster local" in checked.stdout, checked.stdout + checked.stderr
    rendered = hpcdist(["render", "-q", "--cluster", str(drafted), "--nodes", "3", "--job-dir", str(tmp_path / "job"),
                        "--test-only", "--", "--batch-size", "96"], tmp_path, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert "to start at" in rendered.stderr  # sbatch --test-only's own answer


def test_a_partition_maxtime_refuses_a_longer_time_and_defaulttime_fills_a_missing_one(tmp_path: Path) -> None:
    with short_partition():
        refused = hpcdist(["render", "-q", "--partition", SHORT, "--time", "10", "--job-dir", str(tmp_path / "long")],
                          tmp_path, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.strip() == (f"hpcdist render: --time 10 exceeds partition '{SHORT}''s MaxTime 00:05:00; "
                                          "ask for at most that, or another --partition")
        assert not (tmp_path / "long").exists()
        submitted = hpcdist(["submit", "--via", "sbatch", "--partition", SHORT, "--time", "00:06:00", "--job-dir",
                             str(tmp_path / "long2")], tmp_path, timeout=60)
        assert submitted.returncode == 2 and "MaxTime 00:05:00" in submitted.stderr
        assert "Submitted" not in submitted.stdout and not (tmp_path / "long2").exists()
        defaulted = hpcdist(["render", "-q", "--partition", SHORT, "--nodes", "3", "--job-dir", str(tmp_path / "short"),
                             "--test-only", "--", "--batch-size", "96"], tmp_path, timeout=120)
        assert defaulted.returncode == 0, defaulted.stderr
        assert "#SBATCH --time=00:02:00" in (tmp_path / "short" / "job.sbatch").read_text()
        assert f"partition '{SHORT}''s DefaultTime" in defaulted.stderr


def _state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def test_a_job_behind_a_running_three_node_job_is_explained(tmp_path: Path) -> None:
    # The blocker holds one CPU on each of the three nodes; ours needs two per node, so it must wait.
    blocker = subprocess.run(["sbatch", "--parsable", "-N", "3", "--ntasks-per-node", "1", "-p", "debug", "-t", "2",
                              "-J", "hpcdist-blocker", "-o", "/dev/null", "--wrap", "sleep 20"],
                             capture_output=True, text=True, timeout=30)
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = blocker.stdout.strip().split(";")[0]
    ours = None
    try:
        deadline = time.monotonic() + 60
        while _state(blocker_id) != "RUNNING":
            if time.monotonic() > deadline:
                pytest.skip("the shared cluster is busy: the 3-node blocker did not start within 60 s")
            time.sleep(0.5)
        proc = hpcdist(["submit", "--via", "sbatch", "--nodes", "3", "--ntasks-per-node", "2", "--time", "2",
                        "--job-dir", str(tmp_path / "job"), "--", "--max-steps", "1", "--dataset", "synthetic",
                        "--batch-size", "96"],
                       tmp_path, timeout=120, env=environ(tmp_path))
        assert proc.returncode == 0, proc.stderr
        ours = job_id_of(proc.stdout)
        said = ""
        for _ in range(40):
            status = hpcdist(["status", ours], tmp_path, timeout=60)
            said = status.stdout
            if "pending: " in said and "just queued" not in said:
                break
            time.sleep(0.5)
        assert "PENDING" in said, said
        assert "waiting for resources" in said or "waiting behind jobs of higher priority" in said, said
        assert "job(s) ahead of it in its partition" in said, said
        listed = hpcdist(["list"], tmp_path, timeout=60)
        assert f"{ours}: pending: waiting" in listed.stdout, listed.stdout
    finally:
        for job in (ours, blocker_id):
            if job:
                subprocess.run(["scancel", job], capture_output=True, timeout=30)

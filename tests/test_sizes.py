"""Every size has a bound: over it, one line and exit 2 before anything of that size is built or written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from slurm_fixtures import environ

from hpc.cli import main

HUGE = [
    # (arguments, a fragment of the one line)
    (["--ntasks-per-node", "1000000000"], "--ntasks-per-node 1000000000 is over the limit of 65,533"),
    (["--nodes", "100000000"], "--nodes 100000000 is over the limit of 65,536"),
    (["--nodes", "3", "--nodelist", "n[0-99999999]"], "names 100,000,000 hosts; Slurm allows at most 65,536"),
    (["--nodes", "3", "--nodelist", "a[0-65535]b[0-65535]"], "names 4,294,967,296 hosts; hpcdist handles at most"),
    (["--nodes", "3", "--nodelist", "n[0-65535],m[0-65535]"], "names 131,072 hosts"),
    (["--nodes", "65536", "--ntasks-per-node", "64"], "= 4,194,304 ranks, over the limit of 1,048,576"),
    (["--cpus-per-task", "70000"], "--cpus-per-task 70000 is over the limit of 65,535"),
    (["--nodes", "3", "--nodelist", "n[1-3]-ib"], "text after its last ']'"),
    (["--nodes", "3", "--nodelist", "n[\u0661-\u0663]"], "non-ASCII"),
]


def profile(tmp_path: Path) -> str:
    """A site that allows far more nodes than the bounds, so the bounds are what refuses; it names another
    Slurm cluster, so the local cluster's 3-node partition does not."""
    path = tmp_path / "huge.yaml"
    path.write_text("partition: debug\nmax_nodes: 100000000\nslurm_cluster: elsewhere\n")
    return str(path)


@pytest.mark.parametrize("args,message", HUGE, ids=[" ".join(a)[:40] for a, _ in HUGE])
def test_huge_sizes_are_refused_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    job_dir = tmp_path / "job"
    result = CliRunner().invoke(main, ["render", "-q", "--cluster", profile(tmp_path), "-o", str(job_dir), *args],
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not job_dir.exists()


def test_the_reported_hang_ends_at_once(tmp_path: Path) -> None:
    """Before the bound, --ntasks-per-node 1000000000 built a billion-row ranks table and never returned."""
    proc = subprocess.run([sys.executable, "-m", "hpc", "render", "-q", "--ntasks-per-node", "1000000000",
                           "-o", str(tmp_path / "job")], capture_output=True, text=True, timeout=300,
                          env=environ(tmp_path))
    assert proc.returncode == 2 and "over the limit" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--nodes", "255"], "emulates at most 254 nodes"),
    (["--nodes", "255", "--dry-run"], "emulates at most 254 nodes"),
    (["--nodes", "3", "--ntasks-per-node", "400"], "would start 1200 tasks on this machine, over its limit of 1024"),
])
def test_the_local_executor_refuses_what_it_cannot_emulate_before_writing(tmp_path: Path, args: list[str],
                                                                         message: str) -> None:
    job_dir = tmp_path / "job"
    result = CliRunner().invoke(main, ["submit", "--executor", "local", "--cluster", profile(tmp_path),
                                       # A batch that splits, so that only the local runner's limit is at issue.
                                       "-o", str(job_dir), *args, "--", "--batch-size", "306000"],
                                catch_exceptions=False,
                                env={"HPCDIST_HOME": str(tmp_path / "home")})
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not job_dir.exists() and not (tmp_path / "home").exists()


def test_254_local_nodes_still_render(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["submit", "--executor", "local", "--dry-run", "--cluster", profile(tmp_path),
                                       "-o", str(tmp_path / "job"), "--nodes", "254", "--", "--batch-size", "254"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr

"""On the local Slurm: what submitit submits agrees with job.sbatch; cancel, status, logs; refusals clean up."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_fixtures import REPO, environ, hpcdist, job_id_of, requires_slurm
from test_submit_unit import sbatch_directives

from hpc import registry
from hpc.spec import time_seconds

pytestmark = [pytest.mark.slurm, requires_slurm]

LONG_TRAIN = ("--max-steps", "100000", "--epochs", "100000", "--dataset", "synthetic", "--synthetic-size", "1024",
              "--batch-size", "64")


def wait_for_state(home: Path, job: str, wanted: tuple[str, ...], timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = hpcdist(["status", job], home).stdout
        if any(f"  {w}" in line for w in wanted):
            return line
        time.sleep(0.5)
    raise AssertionError(f"job {job} never reached {wanted}: {line}")


def processes_under(job_dir: Path) -> list[str]:
    """Command lines of live processes that mention the job directory (the job's own processes)."""
    out = subprocess.run(["ps", "-ewwo", "stat=,args="], capture_output=True, text=True).stdout
    marks = (str(job_dir / "run"), str(job_dir / "task.sh"), str(job_dir / "submitit"))
    return [line for line in out.splitlines()
            if any(m in line for m in marks) and not line.lstrip().startswith("Z")]


def test_the_submitit_script_agrees_with_the_dry_run(tmp_path):
    home, job_dir = tmp_path / "home", tmp_path / "job"
    args = ["--nodes", "2", "--backend", "deepspeed", "--launcher", "torchrun", "--time", "00:07:00",
            "--job-name", "agree", "--signal", "USR1@45", "--job-dir", str(job_dir), "--", *LONG_TRAIN]
    proc = hpcdist(["submit", *args], home)
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    try:
        submitted = (job_dir / "submitit" / f"{job_id}_submission.sh").read_text()
        batch = (job_dir / "job.sbatch").read_text()
        ours, theirs = sbatch_directives(batch), sbatch_directives(submitted)
        for key in ("nodes", "ntasks-per-node", "cpus-per-task", "partition", "job-name", "signal", "output",
                    "open-mode"):
            assert theirs[key] == ours[key], key
        assert ours["signal"] == "USR1@45" and "requeue" in theirs and "requeue" in ours
        assert "no-kill" in theirs and "no-kill" in ours
        assert time_seconds(theirs["time"]) == time_seconds(ours["time"]) == 420

        # The same setup before the step: job.sbatch sources "$job_dir/setup.sh" with job_dir set above.
        assert f"job_dir={job_dir}" in batch and 'source "$job_dir/setup.sh"' in batch
        assert f"source {job_dir / 'setup.sh'}" in submitted.split("# command")[0]

        # The same step: srun with --kill-on-bad-exit, the step's own geometry and the same task logs, running
        # task.sh in each task (job.sbatch runs it through step.sh, which a relaunch reuses).
        srun = next(line for line in submitted.splitlines() if line.startswith("srun "))
        step = (job_dir / "step.sh").read_text()
        assert 'bash "$job_dir/step.sh"' in batch
        for option in ("--kill-on-bad-exit=1", "--nodes=2", "--ntasks=2"):
            assert option in srun, option
        # step.sh: the job's 2 nodes and 2 tasks unless an elastic relaunch passes fewer nodes.
        assert "--kill-on-bad-exit=1" in step and "nodes=${2:-2}\n" in step
        assert '--nodes="$nodes" --ntasks=$((nodes * 1))' in step
        assert srun.endswith(f"-m submitit.core._submit {job_dir / 'submitit'}")
        assert f"--output={job_dir / 'logs' / 'task-%t.log'}" in srun
        assert f"--output={job_dir / 'logs' / 'task-%t.log'}" in step and f"bash {job_dir / 'task.sh'}" in step
        code = ("import sys, submitit\n"
                "d = submitit.core.utils.DelayedSubmission.load(sys.argv[1])\n"
                "print(d.function.__module__, d.function.__name__, d.args)\n")
        loaded = subprocess.run([sys.executable, "-c", code, str(job_dir / "submitit" / f"{job_id}_submitted.pkl")],
                                capture_output=True, text=True, check=True, env=environ(home)).stdout
        assert loaded.strip() == f"hpc.task run (('bash', '{job_dir / 'task.sh'}'),)"

        # The same requeue decision after the step, on both paths.
        assert f'bash {job_dir / "requeue.sh"} "$?"' in submitted.split("# teardown")[1]
        assert 'exec bash "$job_dir/requeue.sh" "$status"' in batch
    finally:
        subprocess.run(["scancel", job_id], check=False)


@pytest.mark.parametrize("via", ["submitit", "sbatch"])
def test_cancel_stops_a_running_job_and_status_says_cancelled(tmp_path, via):
    home, job_dir = tmp_path / "home", tmp_path / "job"
    proc = hpcdist(["submit", "--via", via, "--nodes", "2", "--backend", "ddp", "--time", "5", "--job-dir",
                    str(job_dir), "--", *LONG_TRAIN], home)
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    try:
        wait_for_state(home, job_id, ("RUNNING",))
        # Wait until the trainer itself is up on both nodes, so the cancel has real processes to stop.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (job_dir / "run" / "metrics.jsonl").exists():
            time.sleep(0.5)
        assert processes_under(job_dir), "the job's processes should be running"
        follow = subprocess.Popen([sys.executable, "-m", "hpc", "logs", job_id, "--follow"], cwd=REPO,
                                  env=environ(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        cancelled = hpcdist(["cancel", job_id], home)
        assert cancelled.returncode == 0 and f"Cancelled job {job_id}" in cancelled.stdout
        line = wait_for_state(home, job_id, ("CANCELLED",), timeout_s=60)
        assert line.startswith(f"{job_id}  CANCELLED")

        out, _ = follow.communicate(timeout=60)
        assert follow.returncode == 0
        assert "task-0.log: " in out
        deadline = time.monotonic() + 30
        while processes_under(job_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_under(job_dir), processes_under(job_dir)
        again = hpcdist(["cancel", str(job_dir)], home)
        assert again.returncode == 0 and "already ended: CANCELLED" in again.stdout
    finally:
        subprocess.run(["scancel", job_id], check=False)


@pytest.mark.parametrize("via", ["submitit", "sbatch"])
def test_a_refused_submission_removes_its_job_dir_and_says_why(tmp_path, via):
    home, job_dir = tmp_path / "home", tmp_path / "job"
    # hpcdist's own partition check would refuse first (tests/test_partition.py); this is Slurm's refusal.
    proc = hpcdist(["submit", "--via", via, "--partition", "nosuchpartition", "--job-dir", str(job_dir)], home,
                   env=environ(home, HPCDIST_PARTITION_CHECK="0"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sbatch refused the job" in proc.stderr and "partition" in proc.stderr.lower()
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not job_dir.exists()
    assert registry.load(home / "jobs.jsonl") == []


def test_logs_of_one_rank(tmp_path):
    home, job_dir = tmp_path / "home", tmp_path / "job"
    proc = hpcdist(["submit", "--nodes", "2", "--backend", "ddp", "--time", "5", "--job-dir", str(job_dir),
                    "--wait", "--", "--max-steps", "2", "--dataset", "synthetic", "--synthetic-size", "256",
                    "--batch-size", "64"], home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = job_id_of(proc.stdout)
    one = hpcdist(["logs", job_id, "--rank", "1"], home)
    assert one.returncode == 0
    assert one.stdout == (job_dir / "logs" / "task-1.log").read_text()
    assert "hostname=n2" in one.stdout
    every = hpcdist(["logs", str(job_dir)], home)
    assert f"==> {job_dir / 'logs' / 'task-0.log'} <==" in every.stdout
    assert f"batch-{job_id}.out" in every.stdout
    bad = hpcdist(["logs", job_id, "--rank", "2"], home)
    assert bad.returncode == 2 and "outside world size 2" in bad.stderr


@pytest.mark.parametrize("via", ["submitit", "sbatch"])
def test_a_preemption_signal_reaches_every_rank_which_checkpoints(tmp_path, via):
    """`scancel --signal=USR1` (what --signal=USR1@N sends before the limit) stops the trainer cleanly.

    With --max-requeues 0 the job is not requeued: it ends FAILED with the trainer's status 75 and says
    how to go on. (The requeue and the exact resume: tests/test_slurm_reliability.py.)
    """
    home, job_dir = tmp_path / "home", tmp_path / "job"
    proc = hpcdist(["submit", "--via", via, "--nodes", "2", "--backend", "ddp", "--time", "5", "--max-requeues",
                    "0", "--job-dir", str(job_dir), "--", *LONG_TRAIN, "--checkpoint-every", "1000000"], home)
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (job_dir / "run" / "metrics.jsonl").exists():
            time.sleep(0.5)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        line = wait_for_state(home, job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout_s=120)
        rank0 = (job_dir / "logs" / "task-0.log").read_text()
        assert re.search(r"stopped by SIGUSR1 at step \d+: checkpoint \S+ written by all ranks", rank0), rank0
        assert [p.name for p in (job_dir / "run" / "checkpoints").iterdir() if p.name.startswith("step")]
        # Every rank wrote its share: rank 1's RNG state sits beside rank 0's in the one checkpoint.
        newest = max((job_dir / "run" / "checkpoints").glob("step*"))
        assert (newest / "rng-rank0.pt").exists() and (newest / "rng-rank1.pt").exists()
        assert line.startswith(f"{job_id}  FAILED  exit=75"), line
        batch = (job_dir / "logs" / f"batch-{job_id}.out").read_text()
        assert "has used its 0 requeue(s); resubmit with --resume" in batch and "requeueing" not in batch, batch
    finally:
        subprocess.run(["scancel", job_id], check=False)


def test_a_job_directory_the_nodes_cannot_see_is_a_storage_ending_naming_the_host_not_unknown(tmp_path):
    # A mount made after the cluster started is invisible in the nodes' mount namespaces: a local disk or a
    # private /tmp on a real cluster. Slurm cannot open the batch log there, and the script never runs.
    invisible = tmp_path / "invisible"
    invisible.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(invisible)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        job_dir = invisible / "job"
        done = hpcdist(["submit", "--nodes", "1", "--backend", "ddp", "--time", "5", "--job-dir", str(job_dir),
                        "--wait", "--", "--max-steps", "5", "--dataset", "synthetic", "--synthetic-size", "256"],
                       tmp_path / "home", timeout=120)
        lines = (job_dir / "attempts.jsonl").read_text().splitlines()
    finally:
        subprocess.run(["umount", str(invisible)], check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    job = job_id_of(done.stdout)
    assert re.search(rf"storage: the job directory {job_dir} is not visible \(or not writable\) on n[1-3]: Slurm "
                     rf"could not open {job_dir}/logs/batch-{job}.out there", done.stderr), done.stderr
    [line] = [json.loads(x) for x in lines]
    assert (line["ending"], line["action"]) == ("storage", "none") and line["node"] in ("n1", "n2", "n3")

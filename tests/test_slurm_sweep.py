"""Issue 14 on the local 3-node Slurm: a throttled job array, dependency chains, --exclude, a preempted array task.

Every job trains for a few steps (20-150) on 1024 synthetic images with one thread per rank. The jobs of
the three scenarios are submitted first and waited for together, so the cluster runs them side by side.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_fixtures import hpcdist, job_id_of, read_summary, requires_slurm

from hpc import jobs
from hpc.slurm import states as slurm_states

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]

TINY = ("--max-steps", "20", "--dataset", "synthetic", "--synthetic-size", "1024", "--batch-size", "64",
        "--threads", "1")
LONG_STEPS = 150
# 16 steps per epoch: enough epochs that --max-steps decides when the run ends.
LONG = ("--max-steps", str(LONG_STEPS), "--epochs", "20", "--log-every", "1", "--dataset", "synthetic",
        "--synthetic-size", "1024", "--batch-size", "64", "--threads", "1")


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def sacct(job_id: str, duplicates: bool = False) -> dict[str, list[dict[str, str]]]:
    """JobID -> its rows (oldest first with ``duplicates``): State, Start, End, NodeList."""
    proc = subprocess.run(["sacct", "-X", "-n", "-P", *(["-D"] if duplicates else []), "-j", job_id,
                           "-o", "JobID,State,Start,End,NodeList"], capture_output=True, text=True, timeout=60)
    out: dict[str, list[dict[str, str]]] = {}
    for line in proc.stdout.splitlines():
        job, state, start, end, nodes = line.split("|")
        out.setdefault(job, []).append({"state": state.split()[0], "start": start, "end": end, "nodes": nodes})
    return out


def when(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


def reason(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True, text=True,
                          timeout=60).stdout.strip()


def wait_done(job_ids: list[str], timeout_s: float) -> dict[str, jobs.JobState]:
    deadline = time.monotonic() + timeout_s
    final: dict[str, jobs.JobState] = {}
    while len(final) < len(job_ids) and time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id not in final:
                state = jobs.slurm_state(job_id)
                if state.done:
                    final[job_id] = state
        time.sleep(1.0)
    assert len(final) == len(job_ids), f"still running after {timeout_s}s: {set(job_ids) - set(final)}"
    return final


def most_at_once(intervals: list[tuple[datetime.datetime, datetime.datetime]]) -> int:
    """The most intervals [start, end) that hold at one moment (sacct's times are whole seconds)."""
    return max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)


def tiny_job(home: Path, job_dir: Path, via: str, *extra: str, train: tuple[str, ...] = TINY) -> str:
    return job_id_of(ok(hpcdist(["submit", "--via", via, "--time", "5", "--job-dir", str(job_dir), *extra, "--",
                                 *train], home, timeout=120)))


def test_sweep_arrays_throttle_exclude_chains_and_a_preempted_task(tmp_path):
    home = tmp_path / "home"
    cancel: list[str] = []
    try:
        # 1. A 2 x 3 sweep, at most 2 tasks at once, kept off n2.
        grid_dir = tmp_path / "grid"
        out = ok(hpcdist(["sweep", "-o", str(grid_dir), "--grid", "backend=dp,ddp", "train.lr=1e-3,2e-3,5e-3",
                          "--max-parallel", "2", "--exclude", "n2", "--time", "5", "--", *TINY], home, timeout=120))
        grid_id = re.search(r"Submitted job array (\d+) \(0-5%2, 6 task\(s\)\)", out).group(1)
        cancel.append(grid_id)

        # 2. A preempted array task resumes alone: three 1-node tasks, the middle one signalled.
        pre_dir = tmp_path / "preempt"
        out = ok(hpcdist(["sweep", "-o", str(pre_dir), "--grid", "train.seed=1,2,3", "--time", "5", "--", *LONG],
                         home, timeout=120))
        pre_id = re.search(r"Submitted job array (\d+)", out).group(1)
        cancel.append(pre_id)

        # 3. Chains: afterok runs after a completed job, afternotok after a failed one; the other never.
        good = tiny_job(home, tmp_path / "good", "sbatch")
        # The data folder exists (the submit-time check passes) but holds empty files: the job fails at run time.
        bad_data = tmp_path / "bad-data" / "cifar-10-batches-py"
        bad_data.mkdir(parents=True)
        for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                     "batches.meta"):
            (bad_data / name).write_bytes(b"")
        bad = tiny_job(home, tmp_path / "bad", "submitit",
                       train=(*TINY, "--dataset", "cifar10", "--data-dir", str(bad_data.parent)))
        cancel += [good, bad]
        after_good = tiny_job(home, tmp_path / "after-good", "submitit", "--after", good, "--nodes", "2",
                              "--exclude", "n2")
        notok_good = tiny_job(home, tmp_path / "notok-good", "sbatch", "--after", f"{good}:notok")
        after_bad = tiny_job(home, tmp_path / "after-bad", "submitit", "--after", bad)
        notok_bad = tiny_job(home, tmp_path / "notok-bad", "sbatch", "--after", f"{bad}:notok")
        cancel += [after_good, notok_good, after_bad, notok_bad]

        # Signal the middle task of the preemption sweep once it has logged step 5.
        pre_task = f"{pre_id}_1"
        run_dir = pre_dir / "array-0" / "task-1" / "run"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if line.endswith("}")] if (run_dir / "metrics.jsonl").exists() else []
            if steps and max(steps) >= 5:
                assert max(steps) < LONG_STEPS, "the task ended before the signal; raise --max-steps"
                subprocess.run(["scancel", "--signal=USR1", pre_task], check=True, timeout=60)
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"{pre_task} never reached step 5")
        # Skip the requeue's ~120 s BeginTime once Slurm has put the task back in the queue.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and reason(pre_task) != "BeginTime":
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={pre_task}", "StartTime=now"], check=True, timeout=60)

        wait_done([good, bad, after_good, notok_bad], 300)
        # The dependency that can no longer be met leaves its job pending, with Slurm saying so.
        for job_id in (notok_good, after_bad):
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and reason(job_id) != "DependencyNeverSatisfied":
                time.sleep(1.0)
            assert reason(job_id) == "DependencyNeverSatisfied", (job_id, reason(job_id))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = json.loads(ok(hpcdist(["sweep", "status", str(grid_dir), "--json"], home)))
            pre_rows = json.loads(ok(hpcdist(["sweep", "status", str(pre_dir), "--json"], home)))
            if all(r["state"] in slurm_states.TERMINAL for r in rows + pre_rows):
                break
            time.sleep(2.0)

        # -- 1: every task completed with its summary, never more than 2 at once, none on n2.
        assert [r["state"] for r in rows] == ["COMPLETED"] * 6, rows
        for r in rows:
            summary = read_summary(Path(r["job_dir"]))
            assert summary["steps"] == 20 and summary["backend"] in ("dp", "ddp")
            assert r["images_per_s"] and r["final_loss"] is not None and r["peak_memory_mib"]
            assert "n2" not in r["hostnames"], r
        grid_rows = sacct(grid_id)
        intervals = [(when(v[-1]["start"]), when(v[-1]["end"])) for k, v in grid_rows.items()]
        assert len(intervals) == 6, grid_rows
        print(f"SWEEP most tasks at once: {most_at_once(intervals)}; sacct {grid_rows}")
        assert most_at_once(intervals) <= 2
        report = ok(hpcdist(["sweep", "report", str(grid_dir)], home))
        assert report.count("| COMPLETED |") == 6 and (grid_dir / "report.png").stat().st_size > 1000

        # -- 2: the signalled task checkpointed, was requeued once and resumed; its siblings ran once.
        assert [r["state"] for r in pre_rows] == ["COMPLETED"] * 3, pre_rows
        pre_rows_sacct = sacct(pre_id, duplicates=True)
        print(f"PREEMPT sacct -D {pre_rows_sacct}")
        assert [row["state"] for row in pre_rows_sacct[pre_task]] == ["REQUEUED", "COMPLETED"]
        for sibling in (f"{pre_id}_0", f"{pre_id}_2"):
            assert [row["state"] for row in pre_rows_sacct[sibling]] == ["COMPLETED"]
        task_dir = pre_dir / "array-0" / "task-1"
        batch_log = (task_dir / "logs" / f"batch-{pre_task}.out").read_text()
        rank0_log = (task_dir / "logs" / "task-0.log").read_text()
        requeued = f"requeueing job {pre_task} to resume from its checkpoint (restart 1 of 3)"
        assert requeued in batch_log, batch_log[-2000:]
        stopped = re.search(r"stopped by SIGUSR1 at step (\d+): checkpoint (\S+) written", rank0_log)
        assert stopped and f"resumed from {stopped.group(2)} at step {stopped.group(1)}" in rank0_log, rank0_log[-2000:]
        assert read_summary(task_dir)["steps"] == LONG_STEPS
        for i in (0, 2):
            sibling = pre_dir / "array-0" / f"task-{i}"
            log = (sibling / "logs" / "task-0.log").read_text()
            assert "SIGUSR1" not in log and "resumed from" not in log
            assert read_summary(sibling)["steps"] == LONG_STEPS

        # -- 3: afterok started after its job completed, afternotok after its job failed; --exclude n2 held.
        chain = {job: sacct(job)[job][-1] for job in (good, bad, after_good, notok_bad)}
        assert chain[good]["state"] == "COMPLETED" and chain[bad]["state"] == "FAILED", chain
        assert chain[after_good]["state"] == "COMPLETED" and chain[notok_bad]["state"] == "COMPLETED", chain
        assert when(chain[after_good]["start"]) >= when(chain[good]["end"]), chain
        assert when(chain[notok_bad]["start"]) >= when(chain[bad]["end"]), chain
        hosts = {r["hostname"] for r in read_summary(tmp_path / "after-good")["ranks"]}
        assert hosts == {"n1", "n3"}, hosts
    finally:
        if cancel:
            subprocess.run(["scancel", *cancel], check=False, timeout=60)

"""Issue 12 end to end on the local 3-node Slurm: progress while `submit --wait` waits, `top` on a running
2-node job, a STALE rank (kill -STOP / -CONT), a straggler node (a CPU quota on its rank), the start-up
waterfall, and the report of a job preempted once (too abruptly to checkpoint) and resumed.

Faults are real: SIGSTOP freezes a rank's process; a cgroup (v1 cpu controller, or v2 cpu.max) caps the
CPU of one node's rank; `scontrol requeue` + SIGKILL is a preemption whose grace was too short.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from slurm_fixtures import REPO, environ, hpcdist, job_id_of, requires_slurm

from hpc import monitor

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]

# A long job for the live checks (cancelled once they are done); a watchdog that waits out a SIGSTOP.
LONG = ("--max-steps", "5000", "--epochs", "1000", "--dataset", "synthetic", "--synthetic-size", "1024",
        "--batch-size", "64", "--threads", "1", "--log-every", "10", "--hang-timeout-s", "900")


def submit(tmp: Path, name: str, train: tuple[str, ...], *extra: str) -> tuple[str, Path]:
    job_dir = tmp / name
    proc = hpcdist(["submit", "--nodes", "2", "--backend", "ddp", "--time", "10", "--job-name", name,
                    "--job-dir", str(job_dir), *extra, "--", *train], tmp)
    assert proc.returncode == 0, proc.stderr
    return job_id_of(proc.stdout), job_dir


def heartbeat(job_dir: Path, rank: int) -> dict:
    from train.heartbeat import read_all
    return read_all(job_dir / "run").get(rank, {})


def until(predicate, timeout: float, every: float = 1.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def top_json(tmp: Path, job: str) -> dict:
    proc = hpcdist(["top", job, "--once", "--json"], tmp, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def training(job_dir: Path, step: int = 20) -> bool:
    return all(heartbeat(job_dir, r).get("phase") == "train" and heartbeat(job_dir, r).get("step", 0) >= step
               for r in (0, 1))


def rank_pid(job_dir: Path, rank: int) -> int:
    """The rank's PID from its heartbeat, checked against the process's own Slurm environment."""
    pid = heartbeat(job_dir, rank)["pid"]
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
               .split("\0") if "=" in item)
    assert env.get("SLURM_PROCID") == str(rank), env.get("SLURM_PROCID")
    return pid


@contextlib.contextmanager
def cpu_quota(pid: int, percent: int):
    """Cap ``pid`` (all its threads) at ``percent`` of one CPU; moved back and removed afterwards."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    root = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/cpu")
    group = root / f"hpcdist-test-slow-{os.getpid()}"
    group.mkdir()
    try:
        if v2:
            (group / "cpu.max").write_text(f"{percent * 1000} 100000")
        else:
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text(str(percent * 1000))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for task in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(task)
        group.rmdir()


def cancel(tmp: Path, job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="a cgroup CPU quota needs root")
def test_top_shows_a_running_2_node_job_then_a_stale_rank_then_a_straggler_node(tmp_path: Path) -> None:
    job_id, job_dir = submit(tmp_path, "obs-live", LONG)
    try:
        until(lambda: training(job_dir), 240, what="both ranks training")
        data = top_json(tmp_path, job_id)
        assert data["state"] == "RUNNING"
        ranks = {r["rank"]: r for r in data["ranks"]}
        assert sorted(ranks) == [0, 1] and ranks[0]["node"] != ranks[1]["node"]
        node0, node1 = ranks[0]["node"], ranks[1]["node"]
        for r in ranks.values():
            assert r["phase"] == "train" and r["step"] > 0 and r["total_steps"] == 5000
            assert r["step_time_s"] > 0 and r["compute_s"] > 0 and r["comm_s"] >= 0 and r["images_per_s"] > 0
            assert r["heartbeat_age_s"] < 10 and r["rss_bytes"] > 0 and not r["stale"]

        # STALE: rank 0's process frozen; its heartbeat stops, and it comes back after SIGCONT.
        pid = rank_pid(job_dir, 0)
        os.kill(pid, signal.SIGSTOP)
        try:
            stale = until(lambda: [s for s in top_json(tmp_path, job_id)["stale"] if s["rank"] == 0], 60,
                          every=2, what="rank 0 STALE")
            assert stale[0]["node"] == node0 and stale[0]["reason"].startswith("no heartbeat for")
            listed = top_json(tmp_path, job_id)
            # Rank 1 waits in a collective: alive (fresh heartbeat), never blamed as frozen.
            assert all(s["rank"] == 0 for s in listed["stale"] if s["reason"].startswith("no heartbeat"))
        finally:
            os.kill(pid, signal.SIGCONT)
        # The frozen rank was the one the job waited for: it is flagged until its stalled steps leave the window.
        until(lambda: not (lambda seen: seen["stale"] or seen["stragglers"])(top_json(tmp_path, job_id)), 90,
              every=2, what="STALE and the stall's straggler flag to clear after SIGCONT")

        # STRAGGLER: the second node's rank capped at 5% of a CPU; exactly it is flagged, by rank and node.
        with cpu_quota(rank_pid(job_dir, 1), 5):
            # Exactly the capped rank, by rank and node, once the cap shows in its window (a passing flag on rank 0
            # alone was seen once in CI, at stop 28, and not again in three runs here; its cause is not known).
            flagged = until(lambda: (lambda seen: seen if [(s["rank"], s["node"]) for s in seen] == [(1, node1)]
                                     else None)(top_json(tmp_path, job_id)["stragglers"]), 90, every=3,
                            what="rank 1 flagged alone as the straggler")
            assert flagged[0]["compute_ratio"] >= 1.3
            status = hpcdist(["status", job_id], tmp_path, timeout=60).stdout
            assert f"straggler: rank 1 on {node1}" in status, status
        listed = hpcdist(["list"], tmp_path).stdout.splitlines()
        row = dict(zip(listed[0].split(), next(x.split() for x in listed if x.startswith(job_id))))
        state, attempt, step, rate = row["STATE"], row["ATTEMPT"], row["STEP"], row["IMAGES/S"]
        assert (state, attempt) == ("RUNNING", "0") and step.endswith("/5000") and float(rate) > 0, row
    finally:
        cancel(tmp_path, job_id)


def test_wait_prints_progress_while_it_waits_then_the_summary_and_the_waterfall_adds_up(tmp_path: Path) -> None:
    job_dir = tmp_path / "obs-wait"
    train = ("--max-steps", "300", "--epochs", "1000", "--dataset", "synthetic", "--synthetic-size", "1024",
             "--batch-size", "64", "--threads", "1", "--log-every", "10")
    argv = [sys.executable, "-m", "hpc", "submit", "--nodes", "2", "--backend", "ddp", "--time", "10",
            "--job-name", "obs-wait", "--job-dir", str(job_dir), "--wait", "--", *train]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=environ(tmp_path), cwd=REPO)
    arrived = []
    for line in proc.stdout:  # a pipe: plain lines, each as it comes
        arrived.append((time.monotonic(), line.rstrip("\n")))
    assert proc.wait(timeout=600) == 0, "\n".join(x for _, x in arrived)
    ended = arrived[-1][0]
    text = [x for _, x in arrived]
    steps = [(t, x) for t, x in arrived if x.startswith("step ") and "/300" in x]
    assert steps, text
    # Progress lines arrived while the job ran, seconds before the end, and no faster than one per ~5 s.
    assert any(ended - t > 3 for t, x in steps if not x.startswith("step 300/")), text
    assert "\r" not in "".join(text) and "\x1b" not in "".join(text)
    summary = next(x for x in text if x.startswith("summary: "))
    for word in ("images/s", "final loss", "test accuracy", "first step after", "300 steps"):
        assert word in summary, summary
    assert any(x.startswith("attempts: 1") for x in text) and text[-1].split()[1] == "COMPLETED"

    out = hpcdist(["timeline", str(job_dir), "--json"], tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    falls = data["waterfalls"]
    assert sorted(w["rank"] for w in falls) == [0, 1]
    order = ["started", "batch_start", "setup_done", "task_start", "process_start", "torch_imported",
             "process_group_ready", "model_built", "first_step_done"]
    for w in falls:
        assert w["first"] == "submitted" and [p["ends"] for p in w["phases"]] == order
        assert sum(p["seconds"] for p in w["phases"]) == pytest.approx(w["wall_s"], abs=0.01)
        starts = [p["start"] for p in w["phases"]]
        assert starts == sorted(starts)
        # The wall time is the real one: from the registry's submission to the rank's first step mark.
        first_step = heartbeat(job_dir, w["rank"])["marks"]["first_step_done"]
        assert w["start"] + w["wall_s"] == pytest.approx(first_step, abs=0.01)
    assert data["slowest"]["rank"] in (0, 1) and data["slowest"]["phase"]


def test_the_report_of_a_job_preempted_once_and_resumed_counts_the_recomputed_steps(tmp_path: Path) -> None:
    train = ("--max-steps", "200", "--epochs", "1000", "--dataset", "synthetic", "--synthetic-size", "1024",
             "--batch-size", "64", "--threads", "1", "--log-every", "5", "--checkpoint-every", "50",
             "--hang-timeout-s", "900", "--heartbeat-s", "0.25")
    job_id, job_dir = submit(tmp_path, "obs-preempt", train)
    try:
        # The ranks run ~40 steps a second: a beat every 0.25 s and a poll every 0.1 s see step 55 before step 80,
        # well short of the next checkpoint (step 100), which would leave no step to redo.
        until(lambda: heartbeat(job_dir, 0).get("step", 0) >= 55, 300, every=0.1, what="step 55")
        pids = [rank_pid(job_dir, r) for r in (0, 1)]
        # Frozen first: past the next checkpoint while scontrol requeue is still on its way otherwise.
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        # Preempted with no time to checkpoint: requeued, and the ranks killed at once.
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=30)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Slurm's requeue would hold the job back ~120 s (BeginTime); hpcdist's batch shell, which sees the
        # preemption, moves the begin time to 2 s from now (no waiter nudges it here).
        def finished() -> bool:
            out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                                 text=True, timeout=30).stdout.split()
            return bool(out) and out[-1] in ("COMPLETED", "FAILED", "CANCELLED")
        until(finished, 400, every=3, what="the resumed job to end")
    finally:
        cancel(tmp_path, job_id)
    log = (job_dir / "logs" / "task-0.log").read_text()
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed, log[-2000:]
    start = int(resumed.group(1))
    assert start >= 50, log[-2000:]
    # Slurm's own requeue is a preemption, not a crash to retry elsewhere: requeued in place, restarted at once.
    lines = [json.loads(x) for x in (job_dir / "attempts.jsonl").read_text().splitlines()]
    assert [(a["ending"], a["action"]) for a in lines] == [("preempted", "requeue"), ("completed", "none")], lines
    runs = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "Start,End"], capture_output=True,
                          text=True, timeout=30).stdout.split()
    ended, restarted = (datetime.fromisoformat(runs[0].split("|")[1]), datetime.fromisoformat(runs[1].split("|")[0]))
    # The 2 s begin time passes before Slurm's next scheduling pass (bf_interval, 30 s by default, so 2-32 s):
    # well inside the ~120 s Slurm's own requeue would hold the job.
    assert (restarted - ended).total_seconds() <= 60, runs

    proc = hpcdist(["report", job_id], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    folder = job_dir / "report"
    good = json.loads((folder / "goodput.json").read_text())
    metrics = [json.loads(x) for x in (job_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = max(m["step"] for m in metrics[: next(i for i in range(1, len(metrics))
                                                   if metrics[i]["step"] <= metrics[i - 1]["step"])])
    history = monitor.read_histories(job_dir / "run")[0]
    reached = max([logged] + [b.step for b in history if b.attempt == 0])
    # Steps start+1..reached ran twice: once before the preemption and again after resuming from the newest
    # checkpoint. Where the first attempt got to is what rank 0 last logged or last put in a heartbeat,
    # whichever is further.
    assert good["redone_steps"] == reached - start and reached > start and reached >= 55
    assert [a["attempt"] for a in good["attempts"]] == [0, 1]
    assert good["node_s"]["recompute"] > 0 and good["share"]["productive"] > 0
    assert sum(good["share"].values()) == pytest.approx(1.0)
    loss = json.loads((folder / "loss.json").read_text())
    assert [ln["label"] for ln in loss["lines"]] == ["run segment 0", "run segment 1"]
    rate = json.loads((folder / "rate.json").read_text())
    assert [ln["label"] for ln in rate["lines"]] == ["rank 0", "rank 1"]
    # Each rank's rate from its history: a line a checkpoint (phase changes are published at once), both attempts
    # and the break between them.
    assert all(ln["points"] >= 4 for ln in rate["lines"]), rate
    falls = json.loads((folder / "waterfall.json").read_text())["waterfalls"]
    assert sorted({(w["attempt"], w["rank"]) for w in falls}) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "recomputed" in page

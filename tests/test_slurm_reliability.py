"""Issue 6 end to end on the local 3-node Slurm: preemption resumes exactly; a dead rank fails the job fast.

Preemption: `scancel --signal=USR1 JOB` is what Slurm's `--signal=USR1@120` sends before a time limit (in
22.05, without --batch/--full it signals every process of the job's steps, not the batch shell). Every
rank checkpoints at the same step and exits 75, rank 0 leaves run/preempted, requeue.sh requeues the job,
and the rerun resumes (task.sh adds --resume once SLURM_RESTART_COUNT > 0). The losses after the resume
must be the losses of a run that was never interrupted.

A requeued job waits ~125 s before it runs again, so both preemption jobs are submitted and
signalled first and then waited for together; the uninterrupted reference runs use the nodes meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from slurm_fixtures import REPO, environ, hpcdist, job_id_of, read_bytes, read_summary, requires_slurm

from hpc import checkpoints, jobs, logs, monitor, registry
from train import heartbeat

pytestmark = [pytest.mark.slurm, pytest.mark.slow, requires_slurm]

STEPS = 40
# One intra-op thread per rank: six ranks share this machine's two cores, and the same thread count in
# the reference and the resumed run keeps every floating-point reduction in the same order.
# --epochs 3: the trainer stops at the smaller of --max-steps and --epochs (default 2, 32 steps here).
TRAIN = ("--max-steps", str(STEPS), "--epochs", "3", "--log-every", "1", "--dataset", "synthetic",
         "--synthetic-size", "1024", "--batch-size", "64", "--threads", "1")
SIGNAL_AT_STEP = 10
LOSS_TOLERANCE = 1e-6
# A killed rank must end the job this soon: srun --kill-on-bad-exit, not the collective timeout (600 s).
DEATH_BOUND_S = 60.0


@dataclass
class Case:
    name: str
    via: str
    backend: str
    launcher: str
    extra: tuple[str, ...] = ()

    def args(self, job_dir: Path, job_name: str) -> list[str]:
        return ["submit", "--via", self.via, "--nodes", "2", "--backend", self.backend, "--launcher",
                self.launcher, "--time", "10", "--job-name", job_name, "--job-dir", str(job_dir), *self.extra,
                "--", *TRAIN]


# tests/test_drill.py's cells requeue a job through sbatch and check its resumed losses as these do: DeepSpeed's
# launcher preempted (its preempt cell) and ddp under srun warned by its time limit (its time_limit cell). Here the
# other submit path, submitit, with torchrun; HPCDIST_SLURM_FULL=1 adds DeepSpeed's launcher through submitit.
CASES = [
    Case("ddp-torchrun-submitit", "submitit", "ddp", "torchrun"),
    *([Case("deepspeed-zero2-launcher-submitit", "submitit", "deepspeed", "deepspeed",
            ("--zero-stage", "2", "--precision", "fp32"))] if os.environ.get("HPCDIST_SLURM_FULL") == "1" else []),
]


@dataclass
class Outcome:
    """What one preemption job and its uninterrupted reference did."""

    case: Case
    job_dir: Path
    job_id: str
    reference_dir: Path
    reference_id: str
    signalled_at: int = 0            # the newest logged step when USR1 was sent
    restarts_seen: int = 0           # the largest Restarts= scontrol showed while the job existed
    final: jobs.JobState | None = None
    reference_final: jobs.JobState | None = None
    sacct_states: list[str] = field(default_factory=list)


def logged_steps(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl, the last record of a step winning (a resumed run appends)."""
    out: dict[int, float] = {}
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        out[record["step"]] = record["loss"]
    return out


def restarts(job_id: str) -> int:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    m = re.search(r"\bRestarts=(\d+)", proc.stdout)
    return int(m.group(1)) if m else 0


def sacct_duplicates(job_id: str) -> list[str]:
    """Every run of the job, oldest first: `sacct -D` keeps the runs a requeue replaced."""
    proc = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
                          capture_output=True, text=True, timeout=60)
    return [line.split("|")[1].split()[0] for line in proc.stdout.splitlines() if line.split("|")[0] == job_id]


def submit(home: Path, args: list[str]) -> str:
    proc = hpcdist(args, home, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return job_id_of(proc.stdout)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> dict[str, Outcome]:
    """Submit the jobs, signal each at step >= 10, run the references, wait for them all."""
    root = tmp_path_factory.mktemp("preempt")
    home = root / "home"
    outcomes: dict[str, Outcome] = {}
    started = time.monotonic()
    try:
        for case in CASES:
            job_dir = root / case.name
            job_id = submit(home, case.args(job_dir, f"preempt-{case.name}"))
            outcomes[case.name] = Outcome(case, job_dir, job_id, root / f"{case.name}-reference", "")

        # Signal each job as soon as it has logged step 10: late enough that a checkpoint means something,
        # early enough that 30 steps remain to compare after the resume.
        waiting = dict(outcomes)
        deadline = time.monotonic() + 240
        polls = 0
        while waiting and time.monotonic() < deadline:
            polls += 1
            for name, outcome in list(waiting.items()):
                if polls % 10 == 0:  # a job that failed at start-up must not cost the whole deadline
                    state = jobs.slurm_state(outcome.job_id)
                    assert not state.done, f"{name} ended before the signal: {state.line()}\n" + logs.failure_report(
                        registry.read_marker(outcome.job_dir))
                steps = logged_steps(outcome.job_dir / "run")
                newest = max(steps, default=0)
                assert newest < STEPS, f"{name} finished before it could be signalled; raise --max-steps"
                if newest >= SIGNAL_AT_STEP:
                    subprocess.run(["scancel", "--signal=USR1", outcome.job_id], check=True, timeout=60)
                    outcome.signalled_at = newest
                    del waiting[name]
            time.sleep(0.2)
        assert not waiting, f"never reached step {SIGNAL_AT_STEP}: {sorted(waiting)}"
        print(f"TIMING all signalled after {time.monotonic() - started:.1f}s")

        # The references run while the requeued jobs wait out Slurm's requeue delay.
        for outcome in outcomes.values():
            case = outcome.case
            outcome.reference_id = submit(home, Case(case.name, "sbatch", case.backend, case.launcher,
                                                     case.extra).args(outcome.reference_dir, f"ref-{case.name}"))

        deadline = time.monotonic() + 420
        pending = {o.job_id: o for o in outcomes.values()} | {o.reference_id: o for o in outcomes.values()}
        while pending and time.monotonic() < deadline:
            for job_id, outcome in list(pending.items()):
                if job_id == outcome.job_id:
                    outcome.restarts_seen = max(outcome.restarts_seen, restarts(job_id))
                state = jobs.slurm_state(job_id)
                if state.done:
                    if job_id == outcome.job_id:
                        outcome.final = state
                        outcome.sacct_states = sacct_duplicates(job_id)
                    else:
                        outcome.reference_final = state
                    del pending[job_id]
            time.sleep(1.0)
        print(f"TIMING all done after {time.monotonic() - started:.1f}s")
        for o in outcomes.values():
            print(f"PREEMPT {o.case.name}: job {o.job_id} signalled at step {o.signalled_at}, restarts seen "
                  f"{o.restarts_seen}, sacct -D {o.sacct_states}, final {o.final and o.final.line()}")
        yield outcomes
    finally:
        for o in outcomes.values():
            for job_id in (o.job_id, o.reference_id):
                if job_id:
                    subprocess.run(["scancel", job_id], check=False)


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_a_preempted_job_checkpoints_requeues_and_resumes_exactly(preempted, name):
    o = preempted[name]
    batch_log = (o.job_dir / "logs" / f"batch-{o.job_id}.out").read_text()
    rank0_log = (o.job_dir / "logs" / "task-0.log").read_text()

    assert o.final is not None and o.final.ok, f"{o.final}\n{batch_log[-3000:]}\n{rank0_log[-3000:]}"
    # Every rank checkpointed together at one step, then the batch shell requeued the job once.
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+): checkpoint (\S+) written by all ranks", rank0_log)
    assert stopped, rank0_log[-3000:]
    step = int(stopped.group(1))
    assert SIGNAL_AT_STEP <= o.signalled_at <= step < STEPS
    assert f"requeueing job {o.job_id} to resume from its checkpoint (restart 1 of 3)" in batch_log, batch_log[-3000:]
    assert batch_log.count("requeueing job") == 1
    # Slurm's own record of it: a second run, and accounting's first run ended REQUEUED.
    assert o.restarts_seen == 1, o
    assert o.sacct_states[-1] == "COMPLETED" and "REQUEUED" in o.sacct_states[:-1], o.sacct_states
    # The rerun resumed from exactly that checkpoint.
    assert f"resumed from {stopped.group(2)} at step {step}" in rank0_log
    assert not (o.job_dir / "run" / "preempted").exists()

    # Exact resume: every step's loss equals the uninterrupted run's, before and after the stop.
    assert o.reference_final is not None and o.reference_final.ok, o.reference_final
    losses, reference = logged_steps(o.job_dir / "run"), logged_steps(o.reference_dir / "run")
    assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
    differ = {s: (losses[s], reference[s]) for s in reference if abs(losses[s] - reference[s]) > LOSS_TOLERANCE}
    assert not differ, f"losses differ from the uninterrupted run after the resume at {step}: {differ}"
    summary, ref_summary = read_summary(o.job_dir), read_summary(o.reference_dir)
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    digests = {r["param_digest"] for r in summary["ranks"]}
    assert len(digests) == 1, summary["ranks"]
    assert digests == {r["param_digest"] for r in ref_summary["ranks"]}, "final weights differ from the reference"


# ---- a rank that dies ----------------------------------------------------------------------------

def trainer_of(job_id: str, procid: int) -> int | None:
    """The pid of the trainer process that Slurm task ``procid`` of ``job_id`` runs (its rank's python).

    Every node's processes are visible here (the nodes are namespaces of this machine). The task's
    launcher (torchrun's agent) carries the same Slurm variables, so only `python ... -m train` counts.
    """
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") != job_id or env.get("SLURM_PROCID") != str(procid):
            continue
        module = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "-m"]
        if module[:1] == ["train"]:
            return int(proc.name)
    return None


@pytest.mark.parametrize("via,launcher", [("sbatch", "srun"), ("submitit", "torchrun")])
def test_a_killed_rank_fails_the_job_fast_naming_it_and_leaves_a_loadable_checkpoint(tmp_path, via, launcher):
    home, job_dir = tmp_path / "home", tmp_path / "job"
    # --max-retries 0: the failure path; the retry on other nodes is `hpcdist drill`'s (test_drill.py).
    args = ["submit", "--via", via, "--nodes", "2", "--backend", "ddp", "--launcher", launcher, "--time", "10",
            "--max-retries", "0", "--job-dir", str(job_dir), "--wait", "--", "--max-steps", "100000", "--epochs",
            "100000", "--log-every", "1", "--checkpoint-every", "5", "--dataset", "synthetic", "--synthetic-size",
            "1024", "--batch-size", "64", "--threads", "1"]
    waiter = subprocess.Popen([sys.executable, "-m", "hpc", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=environ(home, PYTHONUNBUFFERED="1"))
    job_id = None
    try:
        job_id = job_id_of(waiter.stdout.readline())
        deadline = time.monotonic() + 180
        while max(logged_steps(job_dir / "run"), default=0) < 12 and time.monotonic() < deadline:
            assert waiter.poll() is None, "the job ended before the kill"
            time.sleep(0.2)
        pid = trainer_of(job_id, procid=1)
        assert pid is not None, "rank 1's trainer process not found"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        out, err = waiter.communicate(timeout=DEATH_BOUND_S + 30)
        took = time.monotonic() - killed
    finally:
        if waiter.poll() is None:
            waiter.kill()
        if job_id:
            subprocess.run(["scancel", job_id], check=False)
    print(f"RANK-DEATH {launcher}: job {job_id} ended {took:.1f}s after the kill, exit {waiter.returncode}\n{err}")

    assert took < DEATH_BOUND_S, f"the job outlived its dead rank by {took:.0f}s"
    assert waiter.returncode != 0 and "FAILED" in out, out + err
    # The report names the rank that died and the node it ran on, not the rank that noticed it.
    assert "rank 1" in err and "n2" in err, err
    assert "task-1.log (the failing task)" in err, err

    # The newest complete checkpoint survived the crash: a fresh run resumes from it.
    checkpoints = sorted(p.name for p in (job_dir / "run" / "checkpoints").iterdir() if p.name.startswith("step"))
    assert checkpoints, "no checkpoint was written before the kill"
    newest = int(checkpoints[-1][len("step"):])
    assert newest >= 10 and newest % 5 == 0
    copy = tmp_path / "resume-run"
    shutil.copytree(job_dir / "run", copy)
    resumed = subprocess.run([sys.executable, "-m", "train", "--backend", "ddp", "--run-dir", str(copy), "--resume",
                              "--max-steps", str(newest + 2), "--log-every", "1", "--dataset", "synthetic",
                              "--synthetic-size", "1024", "--batch-size", "64", "--threads", "1"],
                             capture_output=True, text=True, timeout=300, cwd=REPO,
                             env={k: v for k, v in environ(home).items() if not k.startswith("SLURM_")})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(rf"resumed from \S+step{newest:08d} at step {newest}\b", resumed.stdout), resumed.stdout
    assert json.loads((copy / "summary.json").read_text())["steps"] == newest + 2


def live_rank(job_dir: Path, job_id: str, rank: int, attempt: int, step: int, timeout: float = 240) -> dict:
    """Rank ``rank``'s heartbeat once attempt ``attempt`` trained past ``step``, its pid checked in /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            beat = heartbeat.read_all(job_dir / "run")[rank]
            env = (Path("/proc") / str(beat["pid"]) / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, KeyError):
            beat, env = {}, []
        if (beat.get("attempt") == attempt and beat.get("phase") == "train" and (beat.get("step") or 0) >= step
                and f"SLURM_JOB_ID={job_id}".encode() in env and f"SLURM_PROCID={rank}".encode() in env):
            return beat
        time.sleep(0.2)
    pytest.fail(f"rank {rank} of attempt {attempt} never trained past step {step} in {timeout:.0f}s")


def wait_for(found, timeout: float):
    """What ``found()`` returns once it is truthy, polled; the test fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := found():
            return value
        time.sleep(0.2)
    pytest.fail(f"not there after {timeout:.0f}s: {found}")


def waiting_through_a_node_death(args: list[str], home: Path, job_dir: Path, victim
                                 ) -> tuple[str, str, str, str, int]:
    """``hpcdist submit ... --wait`` running while the node ``victim(job_id)`` names is killed for real (slurmd and
    every process, nobody setting it DOWN), and revived once the run has moved off it, as an admin would later (the
    job ends only when Slurm hears from the node, else after SlurmdTimeout, 300 s): (job id, node, stdout, stderr,
    exit status)."""
    node_control = ["bash", str(REPO / "scripts" / "slurm-local.sh")]
    waiter = subprocess.Popen([sys.executable, "-m", "hpc", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=environ(home, PYTHONUNBUFFERED="1"))
    job_id, host, dead = None, None, False
    try:
        job_id = job_id_of(waiter.stdout.readline())
        host = victim(job_id)
        subprocess.run([*node_control, "kill-node", host], check=True, capture_output=True)
        dead = True
        wait_for(lambda: (job_dir / "attempts.jsonl").exists() or waiter.poll() is not None, 120)
        subprocess.run([*node_control, "revive", host], check=True, capture_output=True)
        dead = False
        out, err = waiter.communicate(timeout=240)
    finally:
        if waiter.poll() is None:
            waiter.kill()
        if job_id:
            subprocess.run(["scancel", job_id], check=False)
        if dead:
            subprocess.run([*node_control, "revive", host], check=False, capture_output=True)
    print(out, err)
    return job_id, host, out, err, waiter.returncode


def test_a_killed_rank_is_relaunched_in_place_and_a_node_that_fails_twice_is_left_through_the_queue(tmp_path):
    """No spare node: the first crash is relaunched at once on the same nodes (the node still answers); the
    same node failing again is kept off, and the job, which no longer fits its allocation, goes through the
    queue without it (the fallback path) and trains on the other nodes."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    assert len(set(nodes)) == 3, "this test needs the local 3-node cluster"
    # Disk checkpoints every 400 steps (~10 s), snapshots in node memory every 0.5 s: the relaunch resumes from one.
    args = ["submit", "--nodes", "2", "--backend", "ddp", "--time", "10", "--max-retries", "2", "--job-dir",
            str(job_dir), "--wait", "--", "--max-steps", "100000", "--epochs", "100000", "--log-every", "1",
            "--checkpoint-every", "400", "--snapshot-every-s", "0.5", "--dataset", "synthetic", "--synthetic-size",
            "1024", "--batch-size", "64", "--threads", "1"]
    waiter = subprocess.Popen([sys.executable, "-m", "hpc", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=environ(home, PYTHONUNBUFFERED="1"))
    job_id, backlog = None, None
    try:
        job_id = job_id_of(waiter.stdout.readline())
        first = live_rank(job_dir, job_id, 1, attempt=0, step=60)
        # A backlog ready to take any node that frees up: the relaunch never frees one, so it waits on.
        backlog = subprocess.run(["sbatch", "--parsable", "-N3", "--exclusive", "-J", "backlog", "--wrap", "true"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        os.kill(first["pid"], signal.SIGKILL)
        second = live_rank(job_dir, job_id, 1, attempt=1, step=8)
        assert second["hostname"] == first["hostname"] and second["pid"] != first["pid"]
        state = subprocess.run(["squeue", "-h", "-j", backlog, "-o", "%T"], capture_output=True, text=True)
        assert state.stdout.strip() == "PENDING", state.stdout
        subprocess.run(["scancel", backlog], check=False)
        os.kill(second["pid"], signal.SIGKILL)
        third = live_rank(job_dir, job_id, 1, attempt=2, step=8, timeout=120)
        peer = live_rank(job_dir, job_id, 0, attempt=2, step=8)
    finally:
        for job in (job_id, backlog):
            if job:
                subprocess.run(["scancel", job], check=False)
        out, err = waiter.communicate(timeout=120)
    lines = [json.loads(x) for x in (job_dir / "attempts.jsonl").read_text().splitlines()]
    print(json.dumps(lines, indent=1), out, err)
    assert [(a["ending"], a["rank"], a["node"], a["action"]) for a in lines[:2]] == [
        ("rank_crashed", 1, first["hostname"], "relaunch"), ("rank_crashed", 1, first["hostname"], "retry")]
    assert lines[0]["excluded"] == [] and lines[1]["excluded"] == [first["hostname"]]
    assert "relaunched in the allocation" in lines[0]["reason"] and "through the queue" in lines[1]["reason"]
    assert first["hostname"] not in (third["hostname"], peer["hostname"])
    held = int(re.search(r"from the snapshot at step (\d+) in node memory", lines[0]["reason"]).group(1))
    assert 0 < held <= first["step"] + 30 and held < 400
    relaunched = (job_dir / "logs" / "task-0.log").read_text()
    assert re.search(rf"resumed from \S+/step{held:08d} at step {held} \(a snapshot in node memory\)", relaunched)


@pytest.mark.kills_node
def test_a_node_dead_unseen_by_slurm_with_no_spare_is_left_at_once_through_a_new_job(tmp_path):
    """No spare, no --elastic: rank 1's node dies for real (slurmd and every process, nobody setting it DOWN). The
    step cannot go on in the allocation, and a requeued job would stay COMPLETING on the dead node until Slurm's
    SlurmdTimeout (300 s here): the batch shell submits the run again as a new job without that node (registered,
    linked to the old one), ends its own, and the waiter follows the new job, which resumes from the newest
    checkpoint on the other nodes and completes."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    args = ["submit", "--via", "sbatch", "--nodes", "2", "--backend", "ddp", "--time", "10", "--job-dir",
            str(job_dir), "--wait", "--", "--max-steps", "200", "--epochs", "1000", "--log-every", "1",
            "--checkpoint-every", "20", "--dataset", "synthetic", "--synthetic-size", "1024", "--batch-size", "64",
            "--threads", "1"]
    killed = []

    def second_node(job_id: str) -> str:
        host = live_rank(job_dir, job_id, 1, attempt=0, step=30)["hostname"]
        killed.append(time.time())
        return host

    job_id, host, out, err, status = waiting_through_a_node_death(args, home, job_dir, second_node)
    lines = [json.loads(x) for x in (job_dir / "attempts.jsonl").read_text().splitlines()]
    assert [(a["ending"], a["node"], a["action"], a["source"]) for a in lines] == [
        ("node_failure", host, "resubmit", "batch"), ("completed", None, "none", "batch")], lines
    new_id = lines[1]["job_id"]
    assert new_id != job_id and lines[0]["excluded"] == [host] and lines[0]["reason"].endswith(f": job {new_id}")
    assert f"through the queue as a new job without {host} from the checkpoint at step" in lines[0]["reason"]
    assert status == 0 and f"{new_id}  COMPLETED" in out, out + err
    registered = [json.loads(x) for x in (home / "jobs.jsonl").read_text().splitlines()]
    assert registered[-1]["job_id"] == new_id and registered[-1]["previous"] == job_id
    # One run of the job directory: the old job ended (never requeued); the new one ran on the other nodes.
    old = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    assert not old.strip() or " Restarts=0 " in old, old
    assert {b.hostname for b in monitor.read_heartbeats(job_dir / "run").values()}.isdisjoint({host})
    log = (job_dir / "logs" / "task-0.log").read_text()
    assert re.search(r"resumed from \S+/checkpoints/step\d+ at step \d+", log), log[-2000:]
    first_step = monitor.read_heartbeats(job_dir / "run")[0].marks["first_step_done"]
    print(f"node {host} killed -> the new job's first step: {first_step - killed[0]:.1f} s")
    assert first_step - killed[0] < 60


@pytest.mark.kills_node
@pytest.mark.skipif(os.environ.get("HPCDIST_SLURM_FULL") != "1", reason=(
    "CI drills a dead batch host in tests/test_drill.py's batch_host_loss cell, and the persisted snapshot in "
    "tests/test_train_launch.py; HPCDIST_SLURM_FULL=1 runs this too"))
def test_the_batch_host_killed_while_submit_wait_waits_goes_on_as_one_new_job_without_it(tmp_path):
    """The node running the batch shell dies for real (slurmd and every process, nobody setting it DOWN): the
    waiter sees it in seconds (the surviving rank names it in lost.json, its slurmd does not answer), cancels
    the old job so Slurm never requeues it, and submits the run again without that node; it resumes from the
    newest snapshot the batch host's rank 0 persisted to the job directory in the background (the loop itself
    writes no checkpoint before the kill; the node's memory went with it) and completes, and nothing of the old
    job runs on."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    args = ["submit", "--via", "sbatch", "--nodes", "2", "--backend", "ddp", "--time", "10", "--job-dir",
            str(job_dir), "--wait", "--", "--max-steps", "300", "--epochs", "1000", "--log-every", "1",
            "--snapshot-every-s", "0.2", "--persist-every-s", "0.5", "--dataset", "synthetic", "--synthetic-size",
            "1024", "--batch-size", "64", "--threads", "1"]
    seen = {}

    def batch_host(job_id: str) -> str:
        first = live_rank(job_dir, job_id, 0, attempt=0, step=8)
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        host = re.search(r"BatchHost=(\S+)", shown).group(1)
        assert first["hostname"] == host
        persisted = wait_for(lambda: checkpoints.complete(job_dir / "run" / "checkpoints"), 60)
        seen.update(persisted_step=int(persisted[-1].name[len("step"):]), killed_at=time.time())
        return host

    job_id, host, out, err, status = waiting_through_a_node_death(args, home, job_dir, batch_host)
    persisted_step, killed_at = seen["persisted_step"], seen["killed_at"]
    lines = [json.loads(x) for x in (job_dir / "attempts.jsonl").read_text().splitlines()]
    assert [(a["ending"], a["node"], a["action"], a["source"]) for a in lines] == [
        ("node_failure", host, "resubmit", "waiter"), ("completed", None, "none", "batch")]
    new_id = lines[1]["job_id"]
    assert new_id != job_id
    assert lines[0]["reason"].startswith(f"retry 1 of 2 through the queue as a new job without {host} from ")
    assert lines[0]["reason"].endswith(f"(requeued, it would wait until Slurm declares {host} down): job {new_id}")
    assert status == 0 and f"{new_id}  COMPLETED" in out, out + err
    # One run of the job directory: the old job was cancelled (never requeued), none of its ranks runs on.
    old = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    # (Slurm shows it COMPLETING until its dead node's part is cleaned up; it never went back to the queue.)
    assert not old.strip() or (re.search(r"JobState=(CANCELLED|COMPLETING) ", old) and " Restarts=0 " in old), old
    assert not [p for p in Path("/proc").glob("[0-9]*/environ")
                if f"SLURM_JOB_ID={job_id}\0".encode() in read_bytes(p)]
    registered = [json.loads(x) for x in (home / "jobs.jsonl").read_text().splitlines()]
    assert registered[-1]["job_id"] == new_id and registered[-1]["previous"] == job_id
    log = (job_dir / "logs" / "task-0.log").read_text()
    resumed = re.findall(r"resumed from \S+/checkpoints/\S+ at step (\d+)", log)
    assert resumed and int(resumed[0]) >= persisted_step > 0
    first_step = monitor.read_heartbeats(job_dir / "run")[0].marks["first_step_done"]
    print(f"batch host {host} killed -> the new job's first step: {first_step - killed_at:.1f} s")
    assert first_step - killed_at < 60


@pytest.mark.kills_node
@pytest.mark.skipif(os.environ.get("HPCDIST_SLURM_FULL") != "1", reason=(
    "CI resumes DeepSpeed from a node's part and its partner's copy in tests/test_train_launch.py (two emulated "
    "nodes); HPCDIST_SLURM_FULL=1 runs this on the cluster too"))
def test_deepspeed_whose_node_died_for_real_goes_on_on_the_spare_from_the_snapshot_parts_the_others_hold(tmp_path):
    """ZeRO-2 on 2 nodes and a spare; no disk checkpoint before the kill. The second rank's node dies for real
    (slurmd and every process, nobody setting it DOWN): its optimizer partition survives as the copy the other node
    holds, and the step goes on at once on the spare from that snapshot, made a checkpoint on disk."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    args = ["submit", "--nodes", "2", "--spare-nodes", "1", "--backend", "deepspeed", "--zero-stage", "2",
            "--precision", "fp32", "--time", "10", "--job-dir", str(job_dir), "--wait", "--", "--max-steps", "300",
            "--epochs", "1000", "--log-every", "1", "--checkpoint-every-min", "0", "--snapshot-every-s", "0.5",
            "--dataset", "synthetic", "--synthetic-size", "1024", "--batch-size", "64", "--threads", "1"]
    _, host, out, err, status = waiting_through_a_node_death(
        args, home, job_dir, lambda job_id: live_rank(job_dir, job_id, 1, attempt=0, step=30)["hostname"])
    assert status == 0, out + err
    lines = [json.loads(x) for x in (job_dir / "attempts.jsonl").read_text().splitlines()]
    assert [(a["ending"], a["node"], a["action"]) for a in lines] == [
        ("node_failure", host, "relaunch"), ("completed", None, "none")]
    held = int(re.search(r"relaunched in the allocation on .* from the snapshot at step (\d+) in node memory",
                         lines[0]["reason"]).group(1))
    log = (job_dir / "logs" / "task-0.log").read_text()
    resumed = re.findall(r"resumed from \S+/checkpoints/step(\d+) at step \d+ \(a snapshot in node memory\)", log)
    assert resumed and int(resumed[0]) >= held > 0, log[-3000:]
    summary = read_summary(job_dir)
    assert summary["steps"] == 300 and host not in {r["hostname"] for r in summary["ranks"]}


def test_a_disk_that_fills_during_a_checkpoint_is_a_storage_ending_and_the_read_only_commands_still_answer(
        tmp_path):
    """The job directory on the cluster's small file system (scripts/slurm-local.sh mounts it before the nodes
    start, so every node sees it), filled first to leave 6 MiB: room for one checkpoint of ~3.8 MB, not two."""
    small = Path(os.environ.get("SLURM_LOCAL_BASE", "/tmp/slurm-local")) / "small-disk"
    if not os.path.ismount(small):
        pytest.skip(f"{small} is not mounted (scripts/slurm-local.sh start mounts it)")
    home, job_dir = tmp_path / "home", small / f"job-{tmp_path.name}"
    filler = small / f"filler-{tmp_path.name}"
    try:
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(small).free - (6 << 20))
        done = hpcdist(["submit", "--nodes", "1", "--backend", "ddp", "--time", "5", "--job-dir", str(job_dir),
                        "--wait", "--", "--max-steps", "10", "--checkpoint-every", "5", "--dataset", "synthetic",
                        "--synthetic-size", "256", "--batch-size", "32", "--threads", "1"], home, timeout=300)
        assert done.returncode == 74, done.stdout + done.stderr
        [line] = [json.loads(x) for x in (job_dir / "attempts.jsonl").read_text().splitlines()]
        assert (line["ending"], line["action"], line["step"]) == ("storage", "none", 5)
        assert re.fullmatch(rf"rank 0 on n[1-3]: no space left on device writing checkpoint step00000010 in "
                            rf"{job_dir}/run/checkpoints: [\d,]+ bytes free, about 3,[\d,]+ needed; the previous "
                            r"checkpoint \(step00000005\) is intact: .*", line["detail"]), line["detail"]
        kept = job_dir / "run" / "checkpoints"
        assert os.listdir(kept) == ["step00000005"] and checkpoints.damage(kept / "step00000005") is None
        # Full to the last byte: what only reads still answers, without a traceback.
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k", "oflag=append", "conv=notrunc"],
                       capture_output=True)
        assert shutil.disk_usage(small).free < 64 << 10
        for args in (["status", str(job_dir)], ["list"], ["logs", str(job_dir)], ["top", "--once", str(job_dir)]):
            seen = hpcdist(args, home, timeout=60)
            assert seen.returncode == 0 and "Traceback" not in seen.stderr, (args, seen.stdout, seen.stderr)
    finally:
        filler.unlink(missing_ok=True)
        shutil.rmtree(job_dir, ignore_errors=True)


@pytest.mark.parametrize("backend", ["ddp", pytest.param("deepspeed", marks=pytest.mark.skipif(
    os.environ.get("HPCDIST_SLURM_FULL") != "1", reason="CI runs ddp; HPCDIST_SLURM_FULL=1 runs DeepSpeed too"))])
def test_with_elastic_a_node_that_fails_twice_and_no_spare_goes_on_at_once_on_the_node_left(tmp_path, backend):
    """--elastic, 2 nodes, no spare: the first killed rank is relaunched in place; the same node failing again is
    left, and the step goes on at once on the one node left (no trip through the queue), the global batch kept:
    ddp from a snapshot in node memory, DeepSpeed's ZeRO-2 partitions regrouped through a universal checkpoint."""
    home, job_dir = tmp_path / "home", tmp_path / "job"
    state = ["--checkpoint-every", "100", "--snapshot-every-s", "0.5"] if backend == "ddp" else [
        "--checkpoint-every", "10"]
    zero = ["--zero-stage", "2", "--precision", "fp32"] if backend == "deepspeed" else []
    args = ["submit", "--nodes", "2", "--backend", backend, *zero, "--time", "10", "--max-retries", "2", "--elastic",
            "--job-dir", str(job_dir), "--wait", "--", "--max-steps", "200", "--epochs", "100000", "--log-every",
            "1", *state, "--dataset", "synthetic", "--synthetic-size", "1024", "--batch-size", "64", "--threads",
            "1"]
    waiter = subprocess.Popen([sys.executable, "-m", "hpc", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=environ(home, PYTHONUNBUFFERED="1"))
    job_id = None
    try:
        job_id = job_id_of(waiter.stdout.readline())
        first = live_rank(job_dir, job_id, 1, attempt=0, step=20)
        os.kill(first["pid"], signal.SIGKILL)
        second = live_rank(job_dir, job_id, 1, attempt=1, step=20)
        assert second["hostname"] == first["hostname"]
        os.kill(second["pid"], signal.SIGKILL)
        out, err = waiter.communicate(timeout=240)
    finally:
        if waiter.poll() is None:
            subprocess.run(["scancel", job_id], check=False) if job_id else None
            waiter.kill()
    assert waiter.returncode == 0, out + err
    lines = [json.loads(x) for x in (job_dir / "attempts.jsonl").read_text().splitlines()]
    assert [(a["ending"], a["action"], a.get("nodes")) for a in lines] == [
        ("rank_crashed", "relaunch", None), ("rank_crashed", "relaunch", 1), ("completed", "none", None)]
    assert "elastic: relaunched in the allocation on" in lines[1]["reason"] and lines[1]["excluded"] == [
        first["hostname"]]
    summary = read_summary(job_dir)
    assert summary["world_size"] == 1 and summary["steps"] == 200
    assert summary["ranks"][0]["hostname"] != first["hostname"]
    log = (job_dir / "logs" / "task-0.log").read_text()
    assert "elastic: 1 rank(s), was 2: the global batch 64 kept, 64 a rank" in log
    if backend == "deepspeed":
        assert "resumed from" in log and not list((job_dir / "run" / "checkpoints").glob(".universal-*"))

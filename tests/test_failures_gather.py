"""Specifications of hpc/failures/gather.py and `hpcdist attempt`: the end of an attempt inside the job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hpc import monitor
from hpc.failures import gather, rules
from hpc.failures import record as records
from hpc.failures.evidence import with_context
from hpc.failures.policy import Policy, decide
from hpc.failures.rules import Ending

STATES = {"n1": "idle", "n2": "allocated", "n3": "idle"}


def test_shell_assignments_for_requeue_sh():
    line = {"ending": "preempted", "action": "none", "excluded": []}
    text = gather.shell_assignments(line, {"JobState": "RUNNING"}, 137)
    assert "action=none\n" in text and "end_status=75\n" in text and "already_requeued=0\n" in text
    retry = {"ending": "node_failure", "action": "retry", "excluded": ["n2", "n3"]}
    text = gather.shell_assignments(retry, {"JobState": "PENDING"}, 143, [{"action": "retry"}])
    assert "exclude=n2,n3\n" in text and "already_requeued=1\n" in text and "uses=2\n" in text
    relaunch = {"attempt": 3, "ending": "hung", "action": "relaunch", "excluded": ["n2"]}
    text = gather.shell_assignments(relaunch, {"JobState": "RUNNING"}, 76, [{"action": "retry"}])
    assert "action=relaunch\n" in text and "uses=2\n" in text and "next_attempt=4\n" in text


def _attempt_end(tmp_path: Path, *args: str, restarts: str = "0") -> subprocess.CompletedProcess[str]:
    """``hpcdist attempt end`` as requeue.sh runs it, with stub Slurm commands that know nothing."""
    import os
    import sys

    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name in ("scontrol", "sinfo", "sacct", "squeue"):
        (stubs / name).write_text("#!/bin/sh\nexit 1\n")
        (stubs / name).chmod(0o755)
    (tmp_path / "job" / "logs").mkdir(parents=True, exist_ok=True)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": restarts, "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "hpc", "attempt", "end", "--job-dir", str(tmp_path / "job"),
                           *args], capture_output=True, text=True, env={**env, "LANG": os.environ.get("LANG", "C")},
                          timeout=300)


def test_attempt_end_refuses_a_restart_count_that_is_not_one_in_one_line(tmp_path):
    proc = _attempt_end(tmp_path, "--step-status", "1", restarts="x")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "SLURM_RESTART_COUNT" in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "job" / "attempts.jsonl").exists()


def test_attempt_end_reads_only_the_task_logs_that_exist_and_bounds_the_task_count(tmp_path):
    (tmp_path / "job" / "logs").mkdir(parents=True)
    (tmp_path / "job" / "logs" / "task-3.log").write_text("Traceback (most recent call last):\nValueError: boom\n")
    (tmp_path / "job" / "logs" / "batch-7.out").write_text("srun: error: n1: task 3: Exited with exit code 1\n")
    proc = _attempt_end(tmp_path, "--step-status", "1", "--ntasks", "1048576")
    assert proc.returncode == 0, proc.stderr
    assert "ValueError: boom" in (tmp_path / "job" / "attempts.jsonl").read_text()
    proc = _attempt_end(tmp_path, "--step-status", "1", "--ntasks", str(10**12))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1


def _checkpoint(root, step: int) -> None:
    from hpc import checkpoints

    folder = root / checkpoints.name_for(step)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"w" * 64)
    checkpoints.write_manifest(folder, step)


def test_the_attempt_line_names_the_checkpoint_the_retry_will_really_resume_from(tmp_path):
    """Captured case of issue 18: the newest checkpoint (step 120) was damaged, the trainer set it aside and
    resumed from step 80, while the attempt line said step 120."""
    root = tmp_path / "run" / "checkpoints"
    _checkpoint(root, 80)
    _checkpoint(root, 120)
    (root / "step00000120" / "model.pt").write_bytes(b"w" * 10)  # truncated after it was published
    assert gather.checkpoint_in(tmp_path / "run") == 80
    assert gather.gather(tmp_path, "5", 0, 9, 1, 1, runner=lambda argv: subprocess.CompletedProcess(
        argv, 1, "", ""))[0].checkpoint_step == 80
    # Same size, other bytes is the trainer's to catch (SHA-256) when it resumes: hashing here outlasts KillWait.
    (root / "step00000080" / "model.pt").write_bytes(b"x" * 64)
    assert gather.checkpoint_in(tmp_path / "run") == 80
    (root / "step00000080" / "MANIFEST.json").write_text("{")  # unreadable
    assert gather.checkpoint_in(tmp_path / "run") is None
    (root / "step00000080" / "MANIFEST.json").unlink()  # never written
    assert gather.checkpoint_in(tmp_path / "run") is None
    ended = Ending("rank_crashed", "rank 1 on n2: killed by SIGKILL", rank=1, node="n2", signal=9, step=80)
    decision = decide(ended, [], Policy(max_retries=2, nodes=2), STATES)
    line = records.record(ended, decision, attempt=0, job_id="5", started="", ended="", source="batch")
    assert "from the checkpoint at step 80" in records.summary_line(line)


def _bytes_read() -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")))


def test_the_attempt_end_names_the_checkpoint_by_its_manifest_and_sizes_without_reading_its_bytes(tmp_path):
    """After a preemption the batch shell has Slurm's KillWait (30 s) to record the attempt and requeue: hashing a
    50 GB checkpoint there got it SIGKILLed. The trainer checks the checksums when it resumes."""
    from hpc import checkpoints

    root = tmp_path / "run" / "checkpoints"
    for folder, step in ((root, 80), (root / checkpoints.PARTS / "part-0-of-1", 90)):
        (folder / checkpoints.name_for(step)).mkdir(parents=True)
        with open(folder / checkpoints.name_for(step) / "model.pt", "wb") as f:
            f.truncate(64 << 20)  # sparse: 64 MiB to read, none on disk
        checkpoints.write_manifest(folder / checkpoints.name_for(step), step)
    before = _bytes_read()
    assert gather.checkpoint_in(tmp_path / "run") == 90
    assert _bytes_read() - before < 1 << 20


def test_a_batch_shell_numbers_its_attempt_past_every_recorded_one(tmp_path):
    job = tmp_path / "job"
    job.mkdir()

    def number(restarts: str) -> str:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "SLURM_RESTART_COUNT": restarts, "HOME": str(tmp_path)}
        return subprocess.run([sys.executable, "-m", "hpc", "attempt", "number", "--job-dir", str(job)],
                              capture_output=True, text=True, env=env, timeout=300, check=True).stdout.strip()

    assert number("0") == "0" and number("2") == "2"
    # Attempts 0 and 1 ran in one allocation (a relaunch), then Slurm requeued the job once: attempt 2.
    lines = [{"attempt": a, "job_id": "7", "started": "", "ended": "", "ending": e, "action": act, "excluded": []}
             for a, e, act in ((0, "rank_crashed", "relaunch"), (1, "preempted", "requeue"))]
    (job / "attempts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert number("1") == "2" and number("5") == "5"


def test_a_batch_shell_numbers_its_attempt_past_one_that_started_and_died_with_its_batch_shell(tmp_path):
    job = tmp_path / "job"
    (job / "logs").mkdir(parents=True)
    line = {"attempt": 0, "job_id": "7", "started": "", "ended": "", "ending": "node_failure", "action": "relaunch",
            "excluded": ["n2"]}
    (job / "attempts.jsonl").write_text(json.dumps(line) + "\n")
    # Attempt 0 was relaunched in its allocation as attempt 1, whose batch host then died: nothing recorded it.
    (job / "logs" / "batch-7.out").write_text("hpcdist: attempt 0 started on n1 at T0\n"
                                              "hpcdist: attempt 1 started on n1 at T1\n")

    def number(**slurm: str) -> str:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "SLURM_RESTART_COUNT": "1", "HOME": str(tmp_path), **slurm}
        return subprocess.run([sys.executable, "-m", "hpc", "attempt", "number", "--job-dir", str(job)],
                              capture_output=True, text=True, env=env, timeout=300, check=True).stdout.strip()

    assert number(SLURM_JOB_ID="7") == "2"
    # A local task (no Slurm job) has no batch log of its own, and its siblings' starts are not earlier attempts.
    assert number() == "1"


KILLED_ON_N2 = "hpcdist: attempt 0 started on n1 at T\nsrun: error: n2: task 1: Killed\n"


def killed_on_n2(job_dir, nodes: str):
    """Job 7's batch log with rank 1 killed on n2, and a Slurm that says the job runs on ``nodes`` (sinfo rows)."""
    (job_dir / "logs").mkdir()
    (job_dir / "logs" / "batch-7.out").write_text(KILLED_ON_N2)

    def slurm(argv):
        answers = {"scontrol": "JobId=7 JobState=RUNNING Partition=debug StartTime=T TimeLimit=00:10:00 "
                               "RunTime=00:01:00\n", "sinfo": nodes}
        return subprocess.CompletedProcess(argv, 0, answers.get(argv[0], ""), "")
    return slurm


def test_a_rank_killed_in_a_running_allocation_is_relaunched_there(tmp_path):
    """The batch shell's path with Slurm answering: the job still holds its nodes, one spare among them."""
    slurm = killed_on_n2(tmp_path, "n1|allocated\nn2|allocated\nn3|allocated\n")
    line, job = gather.end_attempt(tmp_path, "7", 0, 137, Policy(max_retries=2, nodes=2), 1, 2, runner=slurm,
                                   allocation=["n1", "n2", "n3"])
    assert (line["ending"], line["rank"], line["node"], line["action"]) == ("rank_crashed", 1, "n2", "relaunch")
    assert line["excluded"] == ["n2"] and job["JobState"] == "RUNNING"


def test_the_attempt_line_keeps_what_slurm_and_the_shell_saw_so_it_can_be_classified_again(tmp_path):
    """The context beside the files: with them, a copy of the job directory classifies the same way offline."""
    slurm = killed_on_n2(tmp_path, "n1|allocated\nn2|down*\nn3|allocated\n")
    line, _ = gather.end_attempt(tmp_path, "7", 0, 137, Policy(max_retries=2, nodes=2), 1, 2, runner=slurm,
                                 launcher="torchrun")
    assert records.load(tmp_path)[0]["context"] == line["context"]
    assert {k: line["context"][k] for k in ("step_status", "job_state", "down_nodes", "launcher", "time_left_s")} == {
        "step_status": 137, "job_state": "RUNNING", "down_nodes": ["n2"], "launcher": "torchrun", "time_left_s": 540}
    again = with_context(0, line["context"], batch_log=KILLED_ON_N2)
    assert rules.classify(again).ending == line["ending"] == "node_failure"


def test_a_task_srun_saw_die_of_the_stop_signal_waits_for_its_ranks_checkpoint(tmp_path):
    """Seen under Slurm's OCI containers: the runtime's wrapper died of SIGUSR1 while the rank inside still
    wrote its checkpoint; the marker came a moment later and the attempt is a preemption, not a crash."""
    segment = "srun: error: n1: task 0: User defined signal 1\nsrun: error: n2: task 1: User defined signal 1\n"
    marker, now, naps = tmp_path / "preempted", [0.0], []

    def sleep(s: float) -> None:
        naps.append(s)
        now[0] += s
        if now[0] >= 2.0:
            marker.write_text("12\n")

    assert gather.await_stop_marker(marker, segment, wait_s=30, clock=lambda: now[0], sleep=sleep)
    assert 2.0 <= now[0] < 3.0
    marker.unlink()
    now[0] = -100.0  # the marker never comes within the wait
    assert not gather.await_stop_marker(marker, segment, wait_s=5, clock=lambda: now[0], sleep=sleep)
    naps.clear()
    killed = "srun: error: n2: task 1: Killed\n"
    assert not gather.await_stop_marker(marker, killed, wait_s=30, clock=lambda: 0.0, sleep=naps.append) and not naps


def test_the_snapshots_held_in_memory_are_read_from_each_node_s_local_rank_0_beat(tmp_path):
    from train import nodebeat

    for node, host, held in ((0, "n1", 57), (1, "n2", None)):
        beat = {"rank": node, "hostname": host, "node_rank": node, "local_rank": 0, "step": 60, "time": 1.0,
                "snapshot_step": held}
        nodebeat.Publisher(tmp_path, node).publish(host, 0, 1.0, {node: beat})
    assert gather.snapshots_held(monitor.read_heartbeats(tmp_path)) == {"n1": 57}


def test_a_node_the_ranks_saw_die_unseen_by_slurm_is_left_through_a_new_job_the_batch_shell_submits(tmp_path):
    # No spare: the allocation n1, n2 cannot fit the job without n2, whose ranks vanished and whose slurmd does not
    # answer (run/lost.json); Slurm still calls the job RUNNING and n2 allocated.
    slurm = killed_on_n2(tmp_path, "n1|allocated\nn2|allocated\nn3|idle\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lost.json").write_text(json.dumps({"node": "n2", "ranks": [1], "attempt": 0}))
    asked = []

    def resubmit(excluded):
        asked.append(tuple(excluded))
        return "8"
    line, _ = gather.end_attempt(tmp_path, "7", 0, 137, Policy(max_retries=2, nodes=2), 1, 2, runner=slurm,
                                 allocation=["n1", "n2"], resubmit=resubmit)
    assert asked == [("n2",)]
    assert (line["ending"], line["node"], line["action"], line["excluded"]) == ("node_failure", "n2", "resubmit",
                                                                                ["n2"])
    assert line["reason"].endswith("(requeued, it would wait until Slurm declares n2 down): job 8")
    assert "resubmit" in gather.shell_assignments(line, {"JobState": "RUNNING"}, 137)

    def refused(excluded):
        raise RuntimeError("sbatch refused the job: QOSMaxSubmitJobPerUserLimit")
    (tmp_path / "attempts.jsonl").unlink()
    line, _ = gather.end_attempt(tmp_path, "7", 0, 137, Policy(max_retries=2, nodes=2), 1, 2, runner=slurm,
                                 allocation=["n1", "n2"], resubmit=refused)
    assert line["action"] == "retry" and line["reason"].endswith(
        "not submitted again (sbatch refused the job: QOSMaxSubmitJobPerUserLimit): requeued instead")


def test_an_attempt_is_judged_by_its_own_part_of_each_task_log_which_every_attempt_appends_to(tmp_path):
    """srun appends every attempt's output to logs/task-T.log: attempt 1, preempted at step 30, was recorded as
    stopped at step 11 (attempt 0's stop), and a torchrun agent that failed without a root cause was taken for
    attempt 0's rank killed by SIGKILL, and relaunched again. Each task marks where its attempt begins."""
    logs = tmp_path / "logs"
    logs.mkdir()
    stop = "stopped by SIGUSR1 at step {}: checkpoint written by all ranks; exit 75, rerun with --resume\n"
    (logs / "task-0.log").write_text("hpcdist: attempt 0 started on n1 at T\n" + stop.format(11)
                                     + "hpcdist: attempt 1 started on n1 at T\n" + stop.format(30))
    (logs / "batch-7.out").write_text("hpcdist: attempt 1 started on n1 at T\n"
                                      "srun: error: n1: task 0: Exited with exit code 75\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "preempted").write_text("30\n")

    def nothing(argv):
        return subprocess.CompletedProcess(argv, 1, "", "")  # a Slurm that knows nothing
    line, _ = gather.end_attempt(tmp_path, "7", 1, 75, Policy(), 1, 1, runner=nothing)
    assert (line["ending"], line["step"], line["detail"]) == (
        "preempted", 30, "every rank checkpointed at step 30 after SIGUSR1")

    root_cause = ("hpcdist: attempt 0 started on n2 at T\nChildFailedError:\nRoot Cause (first observed failure):\n"
                  "  rank      : 3 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n")
    (logs / "task-1.log").write_text(root_cause + "hpcdist: attempt 1 started on n2 at T\n"
                                     "torch.distributed.elastic.rendezvous.api.RendezvousClosedError\n")
    (logs / "task-0.log").write_text("hpcdist: attempt 0 started on n1 at T\n")  # no part in attempt 1: relaunched
    (logs / "batch-7.out").write_text("hpcdist: attempt 1 started on n1 at T\n"  # on n2 alone (--elastic)
                                      "srun: error: n2: task 1: Exited with exit code 1\n")
    (tmp_path / "run" / "preempted").unlink()
    ev, _, _ = gather.gather(tmp_path, "7", 1, 1, 2, 2, runner=nothing, launcher="torchrun")
    assert ev.task_logs[0] == "" and "Root Cause" not in ev.task_logs[1]
    assert rules.classify(ev).ending != "rank_crashed"

"""Specifications of hpc/attempts.py: every ending classified from real logs, the retry policy, the records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc import attempts
from hpc.attempts import Ending, Evidence, Policy, RankError

DATA = Path(__file__).resolve().parent / "data" / "failures"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "case.json").exists())


def evidence_of(folder: Path) -> Evidence:
    """A fixture captured from a real job (scripts/capture-failure.py) as the batch shell would have seen it."""
    case = json.loads((folder / "case.json").read_text())
    job = case["job"]
    found = (attempts.parse_rank_error(p.read_text()) for p in sorted((folder / "errors").glob("*.json")))
    errors = tuple(e for e in found if e is not None)
    hang = json.loads((folder / "hang.json").read_text()) if (folder / "hang.json").exists() else None
    limit, ran = attempts.slurm_seconds(job.get("TimeLimit", "")), attempts.slurm_seconds(job.get("RunTime", ""))
    return Evidence(
        attempt=case["attempt"], step_status=case["step_status"], batch_log=(folder / "batch.out").read_text(),
        task_logs={int(p.stem.split("-")[1]): p.read_text() for p in folder.glob("task-*.log")},
        errors=errors, preempted=case["preempted"], hang=hang, job_state=job.get("JobState", ""),
        job_reason=job.get("Reason", ""), down_nodes=frozenset(case["down_nodes"]),
        ranks_per_task=case["ranks_per_task"], launcher=case["launcher"],
        time_left_s=(limit - ran) if limit is not None and ran is not None else None,
        warning_s=120, checkpoint_step=case.get("checkpoint_step"))


@pytest.mark.parametrize("name", CASES)
def test_each_real_ending_is_classified_with_its_rank_node_and_cause(name):
    case = json.loads((DATA / name / "case.json").read_text())
    ending = attempts.classify(evidence_of(DATA / name))
    for key, value in case["expect"].items():
        assert getattr(ending, key) == value, (key, ending)


def test_the_fixtures_cover_every_ending_the_drill_injects():
    endings = {json.loads((DATA / n / "case.json").read_text())["expect"]["ending"] for n in CASES}
    assert {"preempted", "time_limit", "node_failure", "rank_crashed", "hung", "bad_input"} <= endings


def test_a_rank_killed_under_torchrun_is_named_from_the_agents_root_cause():
    log = ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
           "============================================================\n"
           "Root Cause (first observed failure):\n[0]:\n  time      : 2026-12-01_09:10:00\n  host      : n2\n"
           "  rank      : 3 (local_rank: 1)\n  exitcode  : -9 (pid: 4242)\n  error_file: <N/A>\n"
           "  traceback : Signal 9 (SIGKILL) received by PID 4242\n")
    ev = Evidence(attempt=0, step_status=1, batch_log="srun: error: n2: task 1: Exited with exit code 1\n",
                  task_logs={1: log}, ranks_per_task=2, launcher="torchrun")
    ending = attempts.classify(ev)
    assert (ending.ending, ending.rank, ending.node, ending.signal) == ("rank_crashed", 3, "n2", 9)
    assert ending.detail == "rank 3 on n2: killed by SIGKILL"


FAKE_ROOT_CAUSE = ("Root Cause (first observed failure):\n[0]:\n  host      : n1\n  rank      : 0 (local_rank: 0)\n"
                   "  exitcode  : -9 (pid: 1)\n")
FAKE_DEEPSPEED = "[ERROR] [launch.py:259:sigkill_handler] ['python', '--local_rank=0'] exits with return code = -11\n"


@pytest.mark.parametrize("launcher,log", [("srun", FAKE_ROOT_CAUSE), ("srun", FAKE_DEEPSPEED),
                                          ("torchrun", FAKE_DEEPSPEED), ("deepspeed", FAKE_ROOT_CAUSE),
                                          ("deepspeed", FAKE_DEEPSPEED)])
def test_a_rank_imitating_a_launchers_report_is_not_believed(launcher, log):
    # The task exited 1 by itself: no launcher of this job reported a dead child, whatever the log says.
    ev = Evidence(attempt=0, step_status=1, batch_log="srun: error: n1: task 0: Exited with exit code 1\n",
                  task_logs={0: "Traceback (most recent call last):\n" + log}, launcher=launcher)
    assert attempts.classify(ev).ending != "rank_crashed"


def test_torchruns_own_root_cause_comes_last_and_outweighs_a_rank_imitating_it():
    real = FAKE_ROOT_CAUSE.replace("-9 (pid: 1)", "1 (pid: 4242)")
    ev = Evidence(attempt=0, step_status=1, batch_log="srun: error: n1: task 0: Exited with exit code 1\n",
                  task_logs={0: FAKE_ROOT_CAUSE + "ChildFailedError:\n" + real}, launcher="torchrun")
    assert attempts.classify(ev).ending != "rank_crashed"


def test_the_deepspeed_launchers_negative_status_is_the_signal():
    ev = Evidence(attempt=0, batch_log="srun: error: n1: task 0: Exited with exit code 247\n",
                  task_logs={0: "[ERROR] [launch.py:259:sigkill_handler] ['python'] exits with return code = -9\n"},
                  ranks_per_task=2, launcher="deepspeed")
    ending = attempts.classify(ev)
    assert (ending.ending, ending.signal, ending.detail) == ("rank_crashed", 9, "ranks 0-1 on n1: killed by SIGKILL")


def test_the_deepspeed_launchers_child_is_named_by_its_local_rank_on_the_node():
    # Task 1 (the second node) runs ranks 2-3; its launcher reports the dead child by command line only.
    child = "['python', '-u', '-m', 'train', '--local_rank=1', '--backend', 'deepspeed']"
    ev = Evidence(attempt=0, batch_log="srun: error: n2: task 1: Exited with exit code 247\n",
                  task_logs={1: f"[ERROR] [launch.py:259:sigkill_handler] {child} exits with return code = -9\n"},
                  ranks_per_task=2, launcher="deepspeed")
    ending = attempts.classify(ev)
    assert (ending.ending, ending.rank, ending.node, ending.signal) == ("rank_crashed", 3, "n2", 9)
    assert ending.detail == "rank 3 on n2: killed by SIGKILL"


def test_a_code_error_names_the_rank_that_raised_not_the_peers_that_lost_it():
    own = RankError(1, "n2", 0, 100.0, "exception", "ValueError: shapes (3,) and (4,) do not match", 1)
    peer = RankError(0, "n1", 0, 99.0, "exception", "RuntimeError: Connection closed by peer [10.0.0.2]:1234", 1)
    ending = attempts.classify(Evidence(attempt=0, step_status=1, errors=(peer, own)))
    assert (ending.ending, ending.rank, ending.node) == ("code_error", 1, "n2")
    assert ending.detail == "rank 1 on n2: ValueError: shapes (3,) and (4,) do not match"


def test_the_same_exception_on_every_rank_says_so():
    errors = tuple(RankError(r, f"n{r + 1}", 0, 100.0 + r, "exception", "KeyError: 'lr'", 1) for r in range(3))
    ending = attempts.classify(Evidence(attempt=0, step_status=1, errors=errors))
    assert ending.detail == "rank 0 on n1: KeyError: 'lr' (the same on 3 ranks)"


def test_an_earlier_attempts_error_does_not_count():
    old = RankError(0, "n1", 0, 1.0, "exception", "ValueError: boom", 1)
    assert attempts.classify(Evidence(attempt=1, step_status=0, errors=(old,))).ending == "completed"


def test_a_cancelled_job_is_not_requeued_even_after_its_ranks_checkpointed():
    ev = Evidence(attempt=0, step_status=143, preempted=True, job_state="CANCELLED",
                  batch_log="slurmstepd-n1: error: *** JOB 5 ON n1 CANCELLED AT 2026-12-01T09:00:00 ***\n")
    ending = attempts.classify(ev)
    assert ending.ending == "cancelled"
    assert attempts.decide(ending, [], Policy(), {}).action == "none"


def test_a_scancel_seen_only_in_the_batch_log_is_cancelled_not_preempted():
    """Captured on the local cluster: scancel of a running sbatch job while scontrol still says RUNNING; the
    ranks checkpointed on the SIGTERM. Requeueing it would make the job impossible to cancel."""
    log = ("hpcdist: attempt 0 started on n1 at 2026-12-01T10:02:48\n"
           "srun: Job step aborted: Waiting up to 7 seconds for job step to finish.\n"
           "slurmstepd-n1: error: *** JOB 31311010 ON n1 CANCELLED AT 2026-12-01T10:03:02 ***\n"
           "srun: error: n2: task 1: Exited with exit code 75\n"
           "srun: error: n1: task 0: Exited with exit code 75\n")
    ev = Evidence(attempt=0, step_status=75, preempted=True, job_state="RUNNING", batch_log=log)
    ending = attempts.classify(ev)
    assert ending.ending == "cancelled"
    assert attempts.decide(ending, [], Policy(), {}).action == "none"


def test_a_preemption_by_slurm_is_not_a_cancel():
    log = "slurmstepd-n1: error: *** JOB 7 ON n1 CANCELLED AT 2026-12-01T10:03:02 DUE TO PREEMPTION ***\n"
    ev = Evidence(attempt=0, step_status=75, preempted=True, job_state="RUNNING", batch_log=log)
    assert attempts.classify(ev).ending == "preempted"


@pytest.mark.parametrize("line,expected", [
    ("hpcdist-train: error: global batch 32 does not split over 3 ranks",
     "global batch 32 does not split over 3 ranks"),
    ("python -m train: error: unrecognized arguments: --nope (see --help)",
     "unrecognized arguments: --nope (see --help)"),
    ("[rank1]: ValueError: bad", "ValueError: bad"),
])
def test_last_error_line_finds_a_ranks_own_error(line, expected):
    log = (f"Epoch: 0 | Batch: 1/16 | Loss: 2.3\n{line}\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert attempts.last_error_line(log) == expected


# ---- the policy ----------------------------------------------------------------------------------

STATES = {"n1": "idle", "n2": "allocated", "n3": "idle"}


def test_a_crashed_rank_is_retried_without_its_node():
    decision = attempts.decide(Ending("rank_crashed", node="n2", step=10), [], Policy(max_retries=2, nodes=2), STATES)
    assert (decision.action, decision.excluded) == ("retry", ("n2",))
    assert decision.reason == "retry 1 of 2 through the queue without n2 from the checkpoint at step 10"


def test_a_lost_node_is_relaunched_at_once_on_the_allocations_spare():
    decision = attempts.decide(Ending("node_failure", node="n2", step=10), [], Policy(max_retries=2, nodes=2), STATES,
                               allocation=["n1", "n2", "n3"])
    assert (decision.action, decision.excluded) == ("relaunch", ("n2",))
    assert decision.reason == "retry 1 of 2: relaunched in the allocation on n1, n3 from the checkpoint at step 10"


def test_a_lost_node_without_a_spare_goes_through_the_queue_without_it():
    decision = attempts.decide(Ending("node_failure", node="n2", step=10), [], Policy(max_retries=2, nodes=2), STATES,
                               allocation=["n1", "n2"])
    assert (decision.action, decision.excluded) == ("retry", ("n2",))


def test_a_killed_rank_without_a_spare_is_relaunched_in_place_once_then_its_node_is_kept_off():
    policy, alloc = Policy(max_retries=3, nodes=2), ["n1", "n2"]
    first = attempts.decide(Ending("rank_crashed", node="n2", step=10), [], policy, STATES, allocation=alloc)
    assert (first.action, first.excluded) == ("relaunch", ())
    assert "relaunched in the allocation on n1, n2" in first.reason
    history = [{"attempt": 0, "ending": "rank_crashed", "node": "n2", "action": "relaunch", "excluded": []}]
    again = attempts.decide(Ending("rank_crashed", node="n2", step=20), history, policy, STATES, allocation=alloc)
    assert (again.action, again.excluded) == ("retry", ("n2",))


def test_relaunches_and_retries_share_one_budget_and_exclusions_accumulate_in_the_allocation():
    history = [{"attempt": 0, "ending": "node_failure", "node": "n2", "action": "relaunch", "excluded": ["n2"]}]
    alloc = ["n1", "n2", "n3", "n4"]
    decision = attempts.decide(Ending("hung", node="n3"), history, Policy(max_retries=2, nodes=2),
                               {**STATES, "n4": "idle"}, allocation=alloc)
    assert (decision.action, decision.excluded) == ("relaunch", ("n2", "n3"))
    assert "on n1, n4" in decision.reason
    spent = attempts.decide(Ending("hung", node="n3"), history, Policy(max_retries=1, nodes=2), STATES,
                            allocation=alloc)
    assert spent.action == "none" and "used its 1 retry" in spent.reason


def test_a_node_the_ranks_saw_vanish_is_a_node_failure_naming_it():
    lost = {"node": "n2", "ranks": [2, 3], "since": 1.0, "declared_by": 0, "attempt": 0}
    ending = attempts.classify(Evidence(attempt=0, step_status=137, lost=lost, checkpoint_step=10))
    assert (ending.ending, ending.node, ending.rank, ending.step) == ("node_failure", "n2", 2, 10)
    assert ending.detail == "node n2 lost: rank(s) 2, 3 vanished and its slurmd does not answer"


def test_only_this_attempts_lost_node_counts(tmp_path):
    (tmp_path / "lost.json").write_text('{"node": "n2", "ranks": [1], "since": 5.0, "declared_by": 0, "attempt": 0}')
    assert attempts.read_lost(tmp_path, 0)["node"] == "n2"
    assert attempts.read_lost(tmp_path, 1) is None
    (tmp_path / "lost.json").write_text('{"node": 7, "attempt": 0}')
    assert attempts.read_lost(tmp_path, 0) is None


def test_retries_are_bounded_and_exclusions_accumulate():
    first = {"attempt": 0, "action": "retry", "excluded": ["n2"]}
    assert attempts.decide(Ending("hung", node="n3"), [first], Policy(max_retries=1, nodes=1), STATES).action == "none"
    decision = attempts.decide(Ending("hung", node="n3"), [first], Policy(max_retries=2, nodes=1), STATES)
    assert decision.excluded == ("n2", "n3")


def test_no_retry_when_the_job_would_no_longer_fit():
    first = {"attempt": 0, "action": "retry", "excluded": ["n1"]}
    decision = attempts.decide(Ending("node_failure", node="n2"), [first], Policy(nodes=2), STATES)
    assert decision.action == "none"
    assert decision.reason == ("not retried: excluding n1, n2 leaves 1 usable node(s) (n3) for a job that needs 2")


def test_a_down_node_does_not_count_as_usable():
    decision = attempts.decide(Ending("rank_crashed", node="n1"), [], Policy(nodes=2), {**STATES, "n3": "down*"})
    assert decision.action == "none"


@pytest.mark.parametrize("ending", ["bad_input", "code_error", "unknown", "completed"])
def test_bad_input_and_code_errors_are_never_retried(ending):
    assert attempts.decide(Ending(ending, node="n1"), [], Policy(), STATES).action == "none"


def test_requeues_are_counted_apart_from_retries():
    history = [{"attempt": 0, "action": "retry", "excluded": []}]
    assert attempts.decide(Ending("preempted"), history, Policy(max_requeues=1), STATES).action == "requeue"
    history.append({"attempt": 1, "action": "requeue", "excluded": []})
    decision = attempts.decide(Ending("time_limit"), history, Policy(max_requeues=1), STATES)
    assert decision.action == "none" and "used its 1 requeue(s)" in decision.reason


# ---- records, accounting, the nudge ---------------------------------------------------------------

def test_an_attempt_is_recorded_once(tmp_path):
    line = attempts.record(Ending("completed"), attempts.Decision("none"), attempt=0, job_id="5", started="",
                           ended="", source="batch")
    assert attempts.append(tmp_path, line) is True
    assert attempts.append(tmp_path, {**line, "source": "sacct"}) is False
    assert [a["source"] for a in attempts.load(tmp_path)] == ["batch"]


def test_runs_the_batch_shell_never_recorded_come_from_accounting():
    runs = attempts.parse_runs("7|NODE_FAIL|0:0|T0|T1|n[1-2]\n7|RUNNING|0:0|T2|Unknown|n[1,3]\n", "7")
    log = "hpcdist: attempt 0 started on n1 at T0\nsrun: error: Node failure on n2\n"
    lines = attempts.from_sacct(runs, [], "7", None, log)
    assert len(lines) == 1
    assert (lines[0]["attempt"], lines[0]["ending"], lines[0]["node"], lines[0]["action"], lines[0]["excluded"]) == (
        0, "node_failure", "n2", "retry", ["n2"])
    assert lines[0]["source"] == "sacct"


def test_a_cancelled_last_run_is_cancelled_and_not_retried():
    runs = attempts.parse_runs("7|CANCELLED by 0|0:15|T0|T1|n1\n", "7")
    [line] = attempts.from_sacct(runs, [], "7")
    assert (line["ending"], line["action"]) == ("cancelled", "none")


def test_attempt_segment_is_the_attempts_own_part_of_the_batch_log():
    log = ("hpcdist: attempt 0 started on n1 at T\nsrun: error: Node failure on n2\n"
           "hpcdist: attempt 1 started on n1 at T\nall good\n")
    assert "Node failure" in attempts.attempt_segment(log, 0) and "all good" not in attempts.attempt_segment(log, 0)
    assert attempts.attempt_segment(log, 1) == "hpcdist: attempt 1 started on n1 at T\nall good\n"


@pytest.mark.parametrize("fields,now,nudge", [
    # Slurm's requeue delay, the old run finished completing 3 s ago: start it.
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:02:01"}, "09:00:03", True),
    # Within 2 s of the requeue the nodes may still refuse the old credential: wait.
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:02:01"}, "09:00:01", False),
    # requeue.sh's own begin time, 2 s ahead: let it come.
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:00:04"}, "09:00:02", False),
    # Eligible, but waiting for the next scheduling pass: start it.
    ({"SubmitTime": "2026-12-01T09:00:00", "EligibleTime": "2026-12-01T09:00:02"}, "09:00:05", True),
])
def test_should_nudge(fields, now, nudge):
    import time as clock

    job = {"JobState": "PENDING", "Reason": "BeginTime", **fields}
    at = clock.mktime(clock.strptime(f"2026-12-01T{now}", "%Y-%m-%dT%H:%M:%S"))
    assert attempts.should_nudge(job, at) is nudge


def test_nudge_only_follows_hpcdists_own_requeue():
    calls = []

    def runner(argv):
        calls.append(argv)
        shown = ("JobState=PENDING Reason=BeginTime SubmitTime=2000-01-01T00:00:00 "
                 "EligibleTime=2099-01-01T00:00:00")
        return subprocess.CompletedProcess(argv, 0, shown, "")
    assert attempts.nudge("5", [{"attempt": 0, "action": "none"}], runner) is False and not calls
    assert attempts.nudge("5", [{"attempt": 0, "action": "retry", "excluded": ["n2"]}], runner) is True
    assert calls[-1] == ["scontrol", "update", "JobId=5", "StartTime=now", "ExcNodeList=n2"]


def test_shell_assignments_for_requeue_sh():
    line = {"ending": "preempted", "action": "none", "excluded": []}
    text = attempts.shell_assignments(line, {"JobState": "RUNNING"}, 137)
    assert "action=none\n" in text and "end_status=75\n" in text and "already_requeued=0\n" in text
    retry = {"ending": "node_failure", "action": "retry", "excluded": ["n2", "n3"]}
    text = attempts.shell_assignments(retry, {"JobState": "PENDING"}, 143, [{"action": "retry"}])
    assert "exclude=n2,n3\n" in text and "already_requeued=1\n" in text and "uses=2\n" in text
    relaunch = {"attempt": 3, "ending": "hung", "action": "relaunch", "excluded": ["n2"]}
    text = attempts.shell_assignments(relaunch, {"JobState": "RUNNING"}, 76, [{"action": "retry"}])
    assert "action=relaunch\n" in text and "uses=2\n" in text and "next_attempt=4\n" in text


def test_a_rank_records_its_own_error(tmp_path):
    attempts.record_rank_error(tmp_path, {"RANK": "3", "SLURMD_NODENAME": "n2", "SLURM_RESTART_COUNT": "1"},
                               "ValueError: x\n  more", "exception", 1)
    [err] = attempts.read_errors(tmp_path)
    assert (err.rank, err.node, err.attempt, err.error) == (3, "n2", 1, "ValueError: x more")


def test_a_rank_frozen_during_set_up_is_named_with_its_phase():
    hang = {"rank": 1, "node": "n2", "step": 0, "phase": "rendezvous", "since": None}
    ending = attempts.classify(Evidence(attempt=0, step_status=attempts.EXIT_HUNG, hang=hang))
    assert (ending.ending, ending.rank, ending.node) == ("hung", 1, "n2")
    assert ending.detail == "rank 1 on n2 froze during set-up (rendezvous), before its first step"


def test_an_attempt_line_without_an_ending_or_with_a_mistyped_field_is_skipped() -> None:
    good = {"attempt": 0, "ending": "completed", "action": "none"}
    lines = [{"attempt": 1}, {"ending": "hung"}, {**good, "attempt": "2"}, {**good, "step": "x"},
             {**good, "attempt": True}, {**good, "attempt": -1}, good]
    assert attempts.parse_attempts("\n".join(json.dumps(x) for x in lines)) == [good]


def test_a_rank_error_keeps_what_it_can_and_needs_a_rank_and_an_error_line() -> None:
    err = attempts.parse_rank_error('{"rank": 1, "error": "ValueError: x", "attempt": 1e400, "time": "now"}')
    assert (err.rank, err.error, err.attempt, err.time) == (1, "ValueError: x", 0, 0.0)
    assert attempts.parse_rank_error('{"rank": "1", "error": "x"}') is None
    assert attempts.parse_rank_error('{"rank": 1, "error": "x", "exit_code": Infinity}').exit_code is None


def test_a_hang_with_unreadable_fields_counts_them_as_absent(tmp_path: Path) -> None:
    (tmp_path / attempts.HANG).write_text(json.dumps({"rank": "0", "since": 1e300, "step": 4, "attempt": 2}))
    assert attempts.read_hang(tmp_path, 2) == {"step": 4, "attempt": 2}
    assert attempts.read_hang(tmp_path, 3) is None
    (tmp_path / attempts.HANG).write_text('{"attempt": "x", "step": 1e400}')
    assert attempts.read_hang(tmp_path, 2).get("step") is None
    (tmp_path / attempts.HANG).write_text('{"attempt": "x", "step": 3}')
    assert attempts.read_hang(tmp_path, 2) == {"step": 3}


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
                          timeout=60)


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
    assert attempts.checkpoint_in(tmp_path / "run") == 80
    assert attempts.gather(tmp_path, "5", 0, 9, 1, 1, runner=lambda argv: subprocess.CompletedProcess(
        argv, 1, "", ""))[0].checkpoint_step == 80
    (root / "step00000080" / "model.pt").write_bytes(b"x" * 64)  # same size, other bytes: SHA-256 catches it
    assert attempts.checkpoint_in(tmp_path / "run") is None
    ended = Ending("rank_crashed", "rank 1 on n2: killed by SIGKILL", rank=1, node="n2", signal=9, step=80)
    decision = attempts.decide(ended, [], Policy(max_retries=2, nodes=2), STATES)
    line = attempts.record(ended, decision, attempt=0, job_id="5", started="", ended="", source="batch")
    assert "from the checkpoint at step 80" in attempts.summary_line(line)


def test_a_batch_shell_numbers_its_attempt_past_every_recorded_one(tmp_path):
    job = tmp_path / "job"
    job.mkdir()

    def number(restarts: str) -> str:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "SLURM_RESTART_COUNT": restarts, "HOME": str(tmp_path)}
        return subprocess.run([sys.executable, "-m", "hpc", "attempt", "number", "--job-dir", str(job)],
                              capture_output=True, text=True, env=env, timeout=60, check=True).stdout.strip()

    assert number("0") == "0" and number("2") == "2"
    # Attempts 0 and 1 ran in one allocation (a relaunch), then Slurm requeued the job once: attempt 2.
    lines = [{"attempt": a, "job_id": "7", "started": "", "ended": "", "ending": e, "action": act, "excluded": []}
             for a, e, act in ((0, "rank_crashed", "relaunch"), (1, "preempted", "requeue"))]
    (job / "attempts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert number("1") == "2" and number("5") == "5"
